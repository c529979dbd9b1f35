//! Amazon S3 and S3-compatible stores: `s3://bucket/key`, at `[sources.s3] endpoint` (path-style
//! requests) or `https://s3.<region>.amazonaws.com`, signed with SigV4 by `aws` credentials.

use std::sync::Arc;

use ::object_store::ObjectStore;
use ::object_store::aws::{AmazonS3Builder, AwsCredential};
use control_client::{Credential, SourceType};

use super::{Client, Cloud, Location, endpoint, split_uri};
use crate::config::Config;
use crate::source::SourceError;

/// The region requests are signed for when none is configured.
const DEFAULT_REGION: &str = "us-east-1";

#[derive(Debug)]
pub struct S3;

impl Cloud for S3 {
    const SOURCE_TYPE: SourceType = SourceType::S3;
    const WANTED: &'static str = "aws or none";
    type Credential = AwsCredential;

    fn locate(uri: &str, config: &Config) -> Result<Location, SourceError> {
        let (bucket, path) = split_uri(uri, "s3://")?;
        let s3 = &config.sources.s3;
        let region = s3.region.as_deref().unwrap_or(DEFAULT_REGION);
        let endpoint = endpoint(
            s3.endpoint.as_deref(),
            format!("https://s3.{region}.amazonaws.com"),
        )?;
        Ok(Location {
            account: None,
            bucket: bucket.to_owned(),
            path,
            endpoint,
        })
    }

    fn build(
        location: &Location,
        config: &Config,
        client: Client<Self>,
        signed: bool,
    ) -> ::object_store::Result<Arc<dyn ObjectStore>> {
        let region = config.sources.s3.region.as_deref();
        let store = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(region.unwrap_or(DEFAULT_REGION))
            .with_endpoint(location.endpoint.as_str().trim_end_matches('/'))
            // Limitation: requests are path-style only; a store that serves only
            // virtual-hosted-style requests cannot be reached.
            .with_virtual_hosted_style_request(false)
            .with_http_connector(client.guard)
            .with_retry(client.retry)
            .with_credentials(client.credentials)
            .with_skip_signature(!signed)
            .build()?;
        Ok(Arc::new(store))
    }

    fn convert(credential: &Credential) -> Option<AwsCredential> {
        match credential {
            Credential::Aws {
                access_key_id,
                secret_access_key,
                session_token,
                ..
            } => Some(AwsCredential {
                key_id: access_key_id.clone(),
                secret_key: secret_access_key.clone(),
                token: session_token.clone(),
            }),
            _ => None,
        }
    }
}
