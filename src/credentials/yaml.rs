//! kubelet reads its `CredentialProviderConfig` as YAML or JSON: the YAML
//! document becomes a JSON value, which serde then reads typed (and strictly)
//! like the JSON form.

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// The first document of `text` as a JSON value.
pub(crate) fn to_json(text: &str) -> Result<Value, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    convert(docs.into_iter().next().unwrap_or(Yaml::Null))
}

fn convert(y: Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(i) => Value::from(i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(r), Value::Number),
        Yaml::String(s) => Value::String(s),
        Yaml::Array(items) => Value::Array(items.into_iter().map(convert).collect::<Result<_, _>>()?),
        Yaml::Hash(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s,
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                out.insert(key, convert(v)?);
            }
            Value::Object(out)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err("YAML aliases are not supported".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubelet_yaml_config_reads_like_its_json_form() {
        let yaml = r#"
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: default
"#;
        let v = to_json(yaml).unwrap();
        assert_eq!(v["providers"][0]["matchImages"][0], "*.dkr.ecr.*.amazonaws.com");
        assert_eq!(v["providers"][0]["args"][0], "get-credentials");
        assert_eq!(v["providers"][0]["env"][0]["value"], "default");
    }

    #[test]
    fn broken_yaml_is_an_error() {
        assert!(to_json("providers: [unclosed").is_err());
    }
}
