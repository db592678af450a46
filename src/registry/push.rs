//! Uploads: blobs (monolithic POST + PUT) and manifests.

use super::client::{absolute_url, expect_success, Access};
use super::policy::RedactedUrl;
use super::{Reference, Registry, RegistryError};
use crate::digest::Digest;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};

impl Registry {
    /// Uploads a blob (monolithic POST + PUT) unless the registry has it.
    pub async fn push_blob(&self, repo: &Reference, data: Bytes) -> Result<Digest, RegistryError> {
        const OP: &str = "pushing blob";
        let digest = Digest::of(&data);
        let base = self.base_url(repo);
        let head_url = format!("{base}/blobs/{digest}");
        let head = self
            .send(OP, repo, Access::Push, Method::HEAD, &head_url, HeaderMap::new(), None)
            .await;
        if matches!(&head, Ok(r) if r.status() == StatusCode::OK) {
            return Ok(digest);
        }
        let start_url = format!("{base}/blobs/uploads/");
        let resp = self
            .send(
                OP,
                repo,
                Access::Push,
                Method::POST,
                &start_url,
                HeaderMap::new(),
                Some(Bytes::new()),
            )
            .await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                op: OP,
                url: RedactedUrl::new(&start_url),
                status: resp.status().as_u16(),
                body: "upload started without a Location header".into(),
            })?;
        let mut put_url = absolute_url(&start_url, location);
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str(&format!("digest={digest}"));
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let resp = self
            .send(OP, repo, Access::Push, Method::PUT, &put_url, headers, Some(data))
            .await?;
        expect_success(OP, &put_url, resp, self.stall()).await?;
        Ok(digest)
    }

    /// Uploads a manifest under a tag or its digest.
    pub async fn push_manifest(
        &self,
        repo: &Reference,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, RegistryError> {
        const OP: &str = "pushing manifest";
        let digest = Digest::of(&body);
        let url = format!("{}/manifests/{reference}", self.base_url(repo));
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|e| RegistryError::Setup(e.to_string()))?,
        );
        let resp = self
            .send(OP, repo, Access::Push, Method::PUT, &url, headers, Some(body))
            .await?;
        expect_success(OP, &url, resp, self.stall()).await?;
        Ok(digest)
    }
}
