//! OCI artifacts that refer to an image (OCI 1.1 `subject`): pushing them,
//! and finding them through the referrers API or, on registries without it,
//! through the fallback tag `<alg>-<hex>` of the subject (an image index
//! listing its referrers).

use super::body::BodyLimit;
use super::client::{expect_success, Access};
use super::hosts::Capabilities;
use super::manifest::{OCI_INDEX, OCI_MANIFEST};
use super::mirror::Job;
use super::{Reference, Registry, RegistryError};
use crate::digest::Digest;
use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};
use reqwest::Method;
use std::collections::HashMap;
use std::str::FromStr;

/// The empty JSON config of artifacts (OCI 1.1).
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";

/// One blob of an artifact.
pub struct ArtifactBlob {
    pub media_type: String,
    pub data: Bytes,
    pub annotations: HashMap<String, String>,
}

/// A blob listed by an artifact manifest.
#[derive(Clone, Debug)]
pub struct ArtifactLayer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub annotations: HashMap<String, String>,
}

/// The manifest an artifact refers to.
#[derive(Clone, Debug)]
pub struct Subject {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// Tag under which registries without the referrers API list a manifest's referrers.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Result<Descriptor, RegistryError> {
    let d = oci_spec::image::Digest::from_str(&digest.to_string()).map_err(|e| RegistryError::Setup(e.to_string()))?;
    Ok(Descriptor::new(MediaType::from(media_type), size, d))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Bytes, RegistryError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| RegistryError::Setup(format!("encoding manifest: {e}")))
}

impl Registry {
    /// Pushes an artifact of `artifact_type` made of `blobs` into `repo`,
    /// referring to `subject`, and tags it with `tags`. Where the registry
    /// does not index referrers itself, the subject's fallback tag is updated.
    pub async fn push_artifact(
        &self,
        repo: &Reference,
        artifact_type: &str,
        blobs: Vec<ArtifactBlob>,
        subject: Option<&Subject>,
        tags: &[String],
    ) -> Result<Digest, RegistryError> {
        let empty = self.push_blob(repo, Bytes::from_static(EMPTY_JSON)).await?;
        let mut config = descriptor(EMPTY_MEDIA_TYPE, &empty, EMPTY_JSON.len() as u64)?;
        config.set_data(Some("e30=".to_string()));
        let mut layers = Vec::with_capacity(blobs.len());
        for b in blobs {
            let size = b.data.len() as u64;
            let digest = self.push_blob(repo, b.data).await?;
            let mut d = descriptor(&b.media_type, &digest, size)?;
            d.set_annotations(Some(b.annotations));
            layers.push(d);
        }
        let mut builder = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .artifact_type(MediaType::from(artifact_type))
            .config(config)
            .layers(layers);
        if let Some(s) = subject {
            builder = builder.subject(descriptor(&s.media_type, &s.digest, s.size)?);
        }
        let manifest: ImageManifest = builder.build().map_err(|e| RegistryError::Setup(e.to_string()))?;
        let body = to_json(&manifest)?;
        let size = body.len() as u64;
        let digest = self
            .push_manifest(repo, &Digest::of(&body).to_string(), OCI_MANIFEST, body.clone())
            .await?;
        for t in tags {
            self.push_manifest(repo, t, OCI_MANIFEST, body.clone()).await?;
        }
        if let Some(s) = subject {
            if self.referrers_api(repo, &s.digest).await?.is_none() {
                let mut entry = descriptor(OCI_MANIFEST, &digest, size)?;
                entry.set_artifact_type(Some(MediaType::from(artifact_type)));
                self.add_to_fallback_tag(repo, &s.digest, entry).await?;
            }
        }
        Ok(digest)
    }

    /// Manifests in `repo` that refer to `subject` with `artifact_type`:
    /// from the referrers API, or from the fallback tag where it is missing.
    pub async fn referrers(
        &self,
        repo: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Digest>, RegistryError> {
        let list = match self.referrers_api(repo, subject).await? {
            Some(index) => index,
            None => match self.fetch_manifest(repo, &fallback_tag(subject)).await {
                Ok((body, _, _)) => parse_index(repo, &body)?,
                Err(RegistryError::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            },
        };
        Ok(list
            .manifests()
            .iter()
            .filter(|d| d.artifact_type().as_ref().map(|t| t.to_string()).as_deref() == Some(artifact_type))
            .filter_map(|d| d.digest().to_string().parse().ok())
            .collect())
    }

    /// The blobs an artifact manifest (by tag or digest) lists.
    pub async fn artifact_layers(
        &self,
        repo: &Reference,
        reference: &str,
    ) -> Result<Vec<ArtifactLayer>, RegistryError> {
        let (body, _, _) = self.fetch_manifest(repo, reference).await?;
        let m: ImageManifest = serde_json::from_slice(&body).map_err(|e| RegistryError::BadManifest {
            image: format!("{}/{}@{reference}", repo.registry, repo.repository),
            reason: format!("not an artifact manifest: {e}"),
        })?;
        Ok(m.layers()
            .iter()
            .filter_map(|d| {
                Some(ArtifactLayer {
                    digest: d.digest().to_string().parse().ok()?,
                    size: d.size(),
                    media_type: d.media_type().to_string(),
                    annotations: d.annotations().clone().unwrap_or_default(),
                })
            })
            .collect())
    }

    /// `GET /v2/<repo>/referrers/<digest>`: the index, or `None` where the
    /// registry has no referrers API (404).
    async fn referrers_api(&self, repo: &Reference, subject: &Digest) -> Result<Option<ImageIndex>, RegistryError> {
        const OP: &str = "listing referrers";
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let object = format!("referrers {subject}");
        let job = Job {
            op: OP,
            repo,
            caps: Capabilities::REFERRERS,
            object: &object,
        };
        let tail = format!("referrers/{subject}");
        let body = match self.fetch_body(job, &tail, headers, BodyLimit::REFERRERS).await {
            Ok((body, _)) => body,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(parse_index(repo, &body)?))
    }

    /// Adds `entry` to the image index under the subject's fallback tag
    /// (replacing an older entry of the same artifact type).
    async fn add_to_fallback_tag(
        &self,
        repo: &Reference,
        subject: &Digest,
        entry: Descriptor,
    ) -> Result<(), RegistryError> {
        let tag = fallback_tag(subject);
        let mut manifests = match self.fetch_manifest(repo, &tag).await {
            Ok((body, _, _)) => parse_index(repo, &body)?.manifests().clone(),
            Err(RegistryError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        manifests.retain(|d| d.artifact_type() != entry.artifact_type() && d.digest() != entry.digest());
        manifests.push(entry);
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .build()
            .map_err(|e| RegistryError::Setup(e.to_string()))?;
        let body = to_json(&index)?;
        let url = format!("{}/manifests/{tag}", self.base_url(repo));
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
        let resp = self
            .send(
                "updating the referrers tag",
                repo,
                Access::Push,
                Method::PUT,
                &url,
                headers,
                Some(body),
            )
            .await?;
        expect_success("updating the referrers tag", &url, resp, self.stall()).await
    }
}

fn parse_index(repo: &Reference, body: &[u8]) -> Result<ImageIndex, RegistryError> {
    serde_json::from_slice(body).map_err(|e| RegistryError::BadManifest {
        image: format!("{}/{}", repo.registry, repo.repository),
        reason: format!("referrers list is not an image index: {e}"),
    })
}
