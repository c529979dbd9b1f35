//! Google Cloud Storage: `gs://bucket/object`, at `[sources.gcs] endpoint` or
//! `https://storage.googleapis.com`, with `bearer` credentials (OAuth access tokens).

use std::sync::Arc;

use ::object_store::ObjectStore;
use ::object_store::gcp::{GcpCredential, GoogleCloudStorageBuilder};
use control_client::{Credential, SourceType};

use super::{Client, Cloud, Location, endpoint, split_uri};
use crate::config::Config;
use crate::source::SourceError;

#[derive(Debug)]
pub struct Gcs;

impl Cloud for Gcs {
    const SOURCE_TYPE: SourceType = SourceType::Gcs;
    const WANTED: &'static str = "bearer or none";
    type Credential = GcpCredential;

    fn locate(uri: &str, config: &Config) -> Result<Location, SourceError> {
        let (bucket, path) = split_uri(uri, "gs://")?;
        let configured = config.sources.gcs.endpoint.as_deref();
        let endpoint = endpoint(configured, "https://storage.googleapis.com".into())?;
        Ok(Location {
            account: None,
            bucket: bucket.to_owned(),
            path,
            endpoint,
        })
    }

    fn build(
        location: &Location,
        _: &Config,
        client: Client<Self>,
        signed: bool,
    ) -> ::object_store::Result<Arc<dyn ObjectStore>> {
        let store = GoogleCloudStorageBuilder::new()
            .with_bucket_name(&location.bucket)
            .with_base_url(location.endpoint.as_str().trim_end_matches('/'))
            .with_http_connector(client.guard)
            .with_retry(client.retry)
            .with_credentials(client.credentials)
            .with_skip_signature(!signed)
            .build()?;
        Ok(Arc::new(store))
    }

    fn convert(credential: &Credential) -> Option<GcpCredential> {
        match credential {
            Credential::Bearer { token, .. } => Some(GcpCredential {
                bearer: token.clone(),
            }),
            _ => None,
        }
    }
}
