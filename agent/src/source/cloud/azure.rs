//! Azure Blob Storage: `https://<account>.blob.<suffix>/<container>/<blob>` (the endpoint is the
//! URI's origin), or `az://<container>/<blob>` in `[sources.azure_blob] account`, at its
//! `endpoint` or `https://<account>.blob.core.windows.net`. Signed by `azure_sas` credentials
//! (the SAS query string) or `bearer` ones (Entra ID access tokens).

use std::sync::Arc;

use ::object_store::ObjectStore;
use ::object_store::azure::{AzureCredential, MicrosoftAzureBuilder, split_sas};
use control_client::{Credential, SourceType};
use url::Url;

use super::{Client, Cloud, Location, endpoint, split_uri};
use crate::config::Config;
use crate::redact::Redacted;
use crate::source::SourceError;

#[derive(Debug)]
pub struct Azure;

impl Cloud for Azure {
    const SOURCE_TYPE: SourceType = SourceType::AzureBlob;
    const WANTED: &'static str = "azure_sas, bearer or none";
    type Credential = AzureCredential;

    fn locate(uri: &str, config: &Config) -> Result<Location, SourceError> {
        match uri.starts_with("az://") {
            true => configured_account(uri, config),
            false => account_url(uri, config),
        }
    }

    fn build(
        location: &Location,
        _: &Config,
        client: Client<Self>,
        signed: bool,
    ) -> ::object_store::Result<Arc<dyn ObjectStore>> {
        let account = location.account.as_deref().unwrap_or_default();
        let store = MicrosoftAzureBuilder::new()
            .with_account(account)
            .with_container_name(&location.bucket)
            .with_endpoint(location.endpoint.as_str().trim_end_matches('/').to_owned())
            .with_http_connector(client.guard)
            .with_retry(client.retry)
            .with_credentials(client.credentials)
            .with_skip_signature(!signed)
            .build()?;
        Ok(Arc::new(store))
    }

    fn convert(credential: &Credential) -> Option<AzureCredential> {
        match credential {
            Credential::AzureSas { sas, .. } => split_sas(sas).ok().map(AzureCredential::SASToken),
            Credential::Bearer { token, .. } => Some(AzureCredential::BearerToken(token.clone())),
            _ => None,
        }
    }
}

/// `az://container/blob`: the account and its endpoint come from the configuration.
fn configured_account(uri: &str, config: &Config) -> Result<Location, SourceError> {
    let (container, path) = split_uri(uri, "az://")?;
    let azure = &config.sources.azure_blob;
    let account = azure
        .account
        .clone()
        .ok_or_else(|| SourceError::InvalidUri {
            uri: Redacted::uri(uri),
            reason: "az:// URIs need [sources.azure_blob] account".into(),
        })?;
    let default = format!("https://{account}.blob.core.windows.net");
    Ok(Location {
        endpoint: endpoint(azure.endpoint.as_deref(), default)?,
        account: Some(account),
        bucket: container.to_owned(),
        path,
    })
}

/// The domains of Azure Blob Storage's public and sovereign clouds: `<account>.blob.<domain>`.
const AZURE_BLOB_DOMAINS: &[&str] = &[
    "core.windows.net",
    "core.chinacloudapi.cn",
    "core.usgovcloudapi.net",
];

/// `https://account.blob.core.windows.net/container/blob`: the URI names its account and
/// endpoint, which must be Azure's (a public or sovereign cloud's blob domain) or the host of
/// `[sources.azure_blob] endpoint`: an account allow entry must not admit a look-alike host,
/// which would be handed the SAS. Its path is percent-decoded, as in any URL.
fn account_url(uri: &str, config: &Config) -> Result<Location, SourceError> {
    let invalid = |reason: &str| SourceError::InvalidUri {
        uri: Redacted::uri(uri),
        reason: reason.to_owned(),
    };
    let url = Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
    if url.scheme() != "https" {
        return Err(invalid(
            "neither az:// nor https://<account>.blob.<domain>/",
        ));
    }
    let account = blob_account(url.host_str().unwrap_or_default(), config).map_err(invalid)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "a query or fragment in the URI (credentials come from the control plane)",
        ));
    }
    let decoded = percent_decode(url.path().trim_start_matches('/'))
        .ok_or_else(|| invalid("the path is not UTF-8"))?;
    let decoded = format!("az://{decoded}");
    let (container, path) = split_uri(&decoded, "az://")?;
    let endpoint = url.origin().ascii_serialization();
    Ok(Location {
        endpoint: Url::parse(&endpoint).map_err(|e| invalid(&e.to_string()))?,
        account: Some(account.to_owned()),
        bucket: container.to_owned(),
        path,
    })
}

/// The account of an https blob URI's `host`, `<account>.blob.<domain>`: the domain one of
/// [`AZURE_BLOB_DOMAINS`] or the host `[sources.azure_blob] endpoint` names, the account 3-24
/// lowercase letters and digits, as Azure's are.
fn blob_account<'h>(host: &'h str, config: &Config) -> Result<&'h str, &'static str> {
    let (account, domain) = host
        .split_once(".blob.")
        .ok_or("neither az:// nor https://<account>.blob.<domain>/")?;
    let configured = config.sources.azure_blob.endpoint.as_deref();
    let configured = configured.and_then(|e| Url::parse(e).ok());
    if !AZURE_BLOB_DOMAINS.contains(&domain)
        && configured.as_ref().and_then(Url::host_str) != Some(host)
    {
        return Err(
            "the host is neither an Azure Blob endpoint nor [sources.azure_blob] endpoint's",
        );
    }
    let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !(3..=24).contains(&account.len()) || !account.bytes().all(valid) {
        return Err("the account name is not 3-24 lowercase letters and digits");
    }
    Ok(account)
}

/// `%XX` sequences decoded (a `+` stays a `+`: this is a path, not a form). Unlike
/// `percent-encoding`'s decoder, a malformed escape is refused rather than kept as it is.
fn percent_decode(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        if byte != b'%' {
            out.push(byte);
            continue;
        }
        let hex = [bytes.next()?, bytes.next()?];
        out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, std::path::Path::new("/x.toml"), []).unwrap()
    }

    #[test]
    fn both_uri_forms_name_account_container_and_blob() {
        let none = config("");
        let uri = "https://acct.blob.core.windows.net/models/a%20b+c/w.bin";
        let l = Azure::locate(uri, &none).unwrap();
        assert_eq!(l.account.as_deref(), Some("acct"));
        assert_eq!(l.bucket, "models");
        assert_eq!(l.path.as_ref(), "a b+c/w.bin");
        assert_eq!(l.endpoint.as_str(), "https://acct.blob.core.windows.net/");

        let emulator = config(
            "[sources.azure_blob]\naccount = 'devstoreaccount1'\n\
             endpoint = 'http://127.0.0.1:10000/devstoreaccount1'",
        );
        let l = Azure::locate("az://models/w.bin", &emulator).unwrap();
        assert_eq!(l.account.as_deref(), Some("devstoreaccount1"));
        let endpoint = "http://127.0.0.1:10000/devstoreaccount1";
        assert_eq!(l.endpoint.as_str(), endpoint);
        let named = config("[sources.azure_blob]\naccount = 'a'");
        let l = Azure::locate("az://models/w.bin", &named).unwrap();
        assert_eq!(l.endpoint.as_str(), "https://a.blob.core.windows.net/");

        for bad in [
            "az://models/w.bin",
            "https://acct.example.com/models/w.bin",
            "http://acct.blob.core.windows.net/models/w.bin",
            "https://acct.blob.core.windows.net/models/w.bin?sig=x",
            "https://acct.blob.core.windows.net/models",
            "https://acct.blob.core.windows.net/models/%zz",
            "https://acct.blob.attacker.example/models/w.bin",
            "https://acct.blob.core.windows.net.attacker.example/models/w.bin",
            "https://.blob.core.windows.net/models/w.bin",
            "https://a.blob.core.windows.net/models/w.bin",
        ] {
            let err = Azure::locate(bad, &none).unwrap_err();
            assert_eq!(err.code(), "invalid_source_uri", "{bad}");
            assert!(!err.to_string().contains("sig=x"), "{err}");
        }
    }

    #[test]
    fn a_sovereign_cloud_a_configured_host_and_a_port_are_kept() {
        let china = "https://acct.blob.core.chinacloudapi.cn/models/w.bin";
        let l = Azure::locate(china, &config("")).unwrap();
        assert_eq!(
            l.endpoint.as_str(),
            "https://acct.blob.core.chinacloudapi.cn/"
        );
        let stack = config("[sources.azure_blob]\nendpoint = 'https://acct.blob.stack.lab'");
        let on_stack = "https://acct.blob.stack.lab:8443/models/w.bin";
        let l = Azure::locate(on_stack, &stack).unwrap();
        assert_eq!(l.endpoint.as_str(), "https://acct.blob.stack.lab:8443/");
        let other_host = "https://acct.blob.elsewhere.lab/models/w.bin";
        assert!(Azure::locate(other_host, &stack).is_err());
    }

    #[test]
    fn sas_and_bearer_sign_and_nothing_else_does() {
        let sas = Credential::AzureSas {
            sas: "sv=2019-12-12&sig=a%2Bb%3D".into(),
            expires_at: std::time::SystemTime::now(),
        };
        let Some(AzureCredential::SASToken(pairs)) = Azure::convert(&sas) else {
            panic!("a SAS converts");
        };
        assert!(pairs.contains(&("sig".into(), "a+b=".into())), "{pairs:?}");
        assert!(Azure::convert(&Credential::None).is_none());
        let aws = Credential::Aws {
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            session_token: None,
            expires_at: std::time::SystemTime::now(),
        };
        assert!(Azure::convert(&aws).is_none());
    }
}
