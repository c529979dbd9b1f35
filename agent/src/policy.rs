//! Node policy: what this node agrees to stage, checked on top of the control plane's decision.
//!
//! Two gates. [`Policy::check_artifact`] runs once per pull, before any source is contacted:
//! the control plane's allowlist decision, lifecycle, trust and channel. [`Policy::check_url`]
//! runs on every URL the node is about to contact, redirect targets included: scheme, host
//! against the node's own allowlist, and plain `http://` only where an entry allows it. The
//! allowlist fails closed: no entry, no source. The bucket-addressed types (`s3`, `gcs`,
//! `azure_blob`) are checked by [`Policy::check_bucket`] instead, before their first request:
//! they only ever contact the endpoint their configuration names.

use control_client::{Artifact, LifecycleState, PolicyDecision, SourceType, TrustState};
use url::Url;

use crate::config::{AllowEntry, PolicyConfig};
use crate::redact::Redacted;

/// Why the node refuses to stage an artifact or contact a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("the control plane denies this source (policy {policy_id})")]
    DeniedByControlPlane { policy_id: String },
    #[error("artifact is revoked")]
    Revoked,
    #[error("artifact is `{state}`, only active and deprecated artifacts are staged")]
    NotActive { state: &'static str },
    #[error("artifact is quarantined")]
    Quarantined,
    #[error("trust `{have}` is below `{need}`, the minimum for channel {channel}")]
    TrustTooLow {
        have: &'static str,
        need: &'static str,
        channel: String,
    },
    #[error("channel {channel} is not staged on this node")]
    ChannelNotAllowed { channel: String },
    #[error("{source_type} source {url} is not on this node's allowlist")]
    SourceNotAllowed {
        source_type: SourceType,
        url: Redacted,
    },
    #[error("{url} uses plain http and no allow entry sets insecure_http")]
    InsecureSource { url: Redacted },
    #[error("{source_type} organisation `{org}` of {url} is not on this node's allowlist")]
    OrgNotAllowed {
        source_type: SourceType,
        org: String,
        url: Redacted,
    },
}

impl PolicyError {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::DeniedByControlPlane { .. } => "policy_denied",
            PolicyError::Revoked => "artifact_revoked",
            PolicyError::NotActive { .. } => "artifact_not_active",
            PolicyError::Quarantined => "artifact_quarantined",
            PolicyError::TrustTooLow { .. } => "trust_too_low",
            PolicyError::ChannelNotAllowed { .. } => "channel_not_allowed",
            PolicyError::SourceNotAllowed { .. } | PolicyError::OrgNotAllowed { .. } => {
                "source_not_allowed"
            }
            PolicyError::InsecureSource { .. } => "insecure_source",
        }
    }
}

/// What an artifact check lets through, with what the caller should warn about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    AdmittedDeprecated,
}

#[derive(Debug, Clone)]
pub struct Policy {
    config: PolicyConfig,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Policy { config }
    }

    /// The gates that depend on the registration alone.
    pub fn check_artifact(&self, artifact: &Artifact) -> Result<Admission, PolicyError> {
        if artifact.source_policy.decision == PolicyDecision::Deny {
            let policy_id = artifact
                .source_policy
                .policy_id
                .clone()
                .unwrap_or_else(|| "unnamed".into());
            return Err(PolicyError::DeniedByControlPlane { policy_id });
        }
        let admission = match artifact.lifecycle_state {
            LifecycleState::Active => Admission::Admitted,
            LifecycleState::Deprecated => Admission::AdmittedDeprecated,
            LifecycleState::Revoked => return Err(PolicyError::Revoked),
            LifecycleState::Registered => {
                return Err(PolicyError::NotActive {
                    state: "registered",
                });
            }
        };
        if artifact.trust_state == TrustState::Quarantined {
            return Err(PolicyError::Quarantined);
        }
        let channel = artifact.channel.as_str();
        let listed = self.config.channels.as_ref();
        if listed.is_some_and(|channels| !channels.iter().any(|c| c == channel)) {
            return Err(PolicyError::ChannelNotAllowed {
                channel: channel.to_owned(),
            });
        }
        let need = self.config.min_trust.get(channel);
        if let Some(need) = need.filter(|need| artifact.trust_state < **need) {
            return Err(PolicyError::TrustTooLow {
                have: artifact.trust_state.name(),
                need: need.name(),
                channel: channel.to_owned(),
            });
        }
        Ok(admission)
    }

    /// The gate on every URL contacted for a source of `source_type`.
    pub fn check_url(&self, source_type: SourceType, url: &Url) -> Result<(), PolicyError> {
        let not_allowed = || PolicyError::SourceNotAllowed {
            source_type,
            url: Redacted::url(url),
        };
        let secure = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(not_allowed()),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(not_allowed());
        }
        let host = url.host_str().ok_or_else(not_allowed)?;
        let mut matching = self
            .rules(source_type)
            .filter(|rule| {
                rule.host
                    .as_deref()
                    .is_some_and(|pattern| host_matches(pattern, host))
            })
            .peekable();
        if matching.peek().is_none() {
            return Err(not_allowed());
        }
        if !secure && !matching.any(|rule| rule.insecure_http) {
            return Err(PolicyError::InsecureSource {
                url: Redacted::url(url),
            });
        }
        Ok(())
    }

    /// The gate on the organisation of a Hub repository (`org` entries, compared without
    /// case, as the Hub compares names), for the URI and for every Hub URL it redirects to.
    pub fn check_org(
        &self,
        source_type: SourceType,
        org: &str,
        uri: &str,
    ) -> Result<(), PolicyError> {
        let listed = self
            .rules(source_type)
            .filter_map(|rule| rule.org.as_deref());
        if listed
            .into_iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(org))
        {
            return Ok(());
        }
        Err(PolicyError::OrgNotAllowed {
            source_type,
            org: org.to_owned(),
            url: Redacted::uri(uri),
        })
    }

    /// The gate on an object of a bucket-addressed source: an entry of `source_type` must
    /// name its bucket (or its account and container), and a plain-http `endpoint` needs
    /// `insecure_http` on a matching entry. `shown` is the object's URI, for the error.
    pub fn check_bucket(
        &self,
        source_type: SourceType,
        bucket: &Bucket<'_>,
        endpoint: &Url,
        shown: &Redacted,
    ) -> Result<(), PolicyError> {
        let mut matching = self
            .rules(source_type)
            .filter(|rule| bucket.matches(rule))
            .peekable();
        if matching.peek().is_none() {
            return Err(PolicyError::SourceNotAllowed {
                source_type,
                url: shown.clone(),
            });
        }
        match endpoint.scheme() {
            "https" => Ok(()),
            "http" if matching.any(|rule| rule.insecure_http) => Ok(()),
            "http" => Err(PolicyError::InsecureSource {
                url: Redacted::url(endpoint),
            }),
            _ => Err(PolicyError::SourceNotAllowed {
                source_type,
                url: Redacted::url(endpoint),
            }),
        }
    }

    /// The gate for sources addressed without a host (the local artifact store).
    pub fn check_source_type(&self, source_type: SourceType, uri: &str) -> Result<(), PolicyError> {
        if self.rules(source_type).next().is_none() {
            return Err(PolicyError::SourceNotAllowed {
                source_type,
                url: Redacted::uri(uri),
            });
        }
        Ok(())
    }

    fn rules(&self, source_type: SourceType) -> impl Iterator<Item = &AllowEntry> {
        self.config
            .allow
            .iter()
            .filter(move |rule| rule.source_type == source_type)
    }
}

/// Where an object of a bucket-addressed source lives: a bucket (`s3`, `gcs`), or a container
/// of a storage account (`azure_blob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket<'a> {
    pub account: Option<&'a str>,
    pub name: &'a str,
}

impl Bucket<'_> {
    /// An entry matches when every one of its fields that applies is set and equal: `bucket`
    /// for a bucket; `account` and `container` for a container, where an unset one matches any.
    fn matches(&self, rule: &AllowEntry) -> bool {
        match self.account {
            None => rule.bucket.as_deref() == Some(self.name),
            Some(account) => {
                let fits =
                    |field: &Option<String>, value| field.as_deref().is_none_or(|f| f == value);
                (rule.account.is_some() || rule.container.is_some())
                    && fits(&rule.account, account)
                    && fits(&rule.container, self.name)
            }
        }
    }
}

/// `host` matches an exact pattern, or `*.example.com` for any name strictly below example.com.
/// Host names compare case-insensitively; the `url` crate already lowercases them.
fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            host.len() > domain.len() + 1
                && host.ends_with(domain)
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
        }
        None => host == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(toml: &str) -> Policy {
        let config: crate::config::Config =
            crate::config::Config::from_toml(toml, std::path::Path::new("/x.toml"), []).unwrap();
        Policy::new(config.policy)
    }

    fn artifact(patch: serde_json::Value) -> Artifact {
        let mut v = serde_json::json!({
            "id": "a@1", "project": "p", "artifact_kind": "blob",
            "source": {"source_type": "https", "uri": "https://h.example/x"},
            "digest": format!("sha256:{}", "0".repeat(64)),
            "lifecycle_state": "active", "trust_state": "unverified", "channel": "dev",
            "source_policy": {"decision": "allow"}
        });
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn code(r: Result<Admission, PolicyError>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.code())
    }

    #[test]
    fn artifact_gates() {
        let p = policy("[policy]\nchannels = ['dev', 'prod']\nmin_trust = { prod = 'verified' }");
        let check = |patch| code(p.check_artifact(&artifact(patch)));
        assert_eq!(check(serde_json::json!({})), "ok");
        assert_eq!(
            p.check_artifact(&artifact(
                serde_json::json!({"lifecycle_state": "deprecated"})
            )),
            Ok(Admission::AdmittedDeprecated)
        );
        assert_eq!(
            check(serde_json::json!({"lifecycle_state": "revoked"})),
            "artifact_revoked"
        );
        assert_eq!(
            check(serde_json::json!({"lifecycle_state": "registered"})),
            "artifact_not_active"
        );
        assert_eq!(
            check(serde_json::json!({"trust_state": "quarantined"})),
            "artifact_quarantined"
        );
        assert_eq!(
            check(serde_json::json!({"channel": "canary"})),
            "channel_not_allowed"
        );
        assert_eq!(
            check(serde_json::json!({"channel": "prod"})),
            "trust_too_low"
        );
        assert_eq!(
            check(serde_json::json!({"channel": "prod", "trust_state": "signed"})),
            "ok"
        );
        let denied = serde_json::json!({"source_policy": {"decision": "deny", "policy_id": "p@2"}});
        assert_eq!(check(denied), "policy_denied");
    }

    #[test]
    fn url_gates() {
        let p = policy(
            "[[policy.allow]]\nsource_type = 'https'\nhost = '*.models.example'\n\
             [[policy.allow]]\nsource_type = 'https'\nhost = '127.0.0.1'\ninsecure_http = true\n\
             [[policy.allow]]\nsource_type = 'https'\nhost = 'plain.example'\n",
        );
        let check = |u: &str| {
            p.check_url(SourceType::Https, &Url::parse(u).unwrap())
                .map(|_| "ok")
                .unwrap_or_else(|e| e.code())
        };
        assert_eq!(check("https://cdn.models.example/w"), "ok");
        assert_eq!(check("https://a.b.models.example/w"), "ok");
        assert_eq!(check("https://models.example/w"), "source_not_allowed");
        assert_eq!(check("https://evilmodels.example/w"), "source_not_allowed");
        assert_eq!(check("http://127.0.0.1:8080/w"), "ok");
        assert_eq!(check("http://plain.example/w"), "insecure_source");
        assert_eq!(check("http://elsewhere.example/w"), "source_not_allowed");
        assert_eq!(check("file:///etc/passwd"), "source_not_allowed");
        assert_eq!(
            check("https://user:pw@cdn.models.example/w"),
            "source_not_allowed"
        );
        let s3 = p.check_url(
            SourceType::S3,
            &Url::parse("https://cdn.models.example/w").unwrap(),
        );
        assert_eq!(s3.unwrap_err().code(), "source_not_allowed");
    }

    #[test]
    fn hub_organisations_are_listed_apart_from_hosts() {
        let p = policy(
            "[[policy.allow]]\nsource_type = 'huggingface'\norg = 'Acme'\n\
             [[policy.allow]]\nsource_type = 'huggingface'\nhost = 'huggingface.co'\n\
             [[policy.allow]]\nsource_type = 'https'\nhost = 'cdn.example'\n",
        );
        let hf = SourceType::Huggingface;
        assert_eq!(p.check_org(hf, "acme", "hf://acme/m/f"), Ok(()));
        let other = p.check_org(hf, "evil", "hf://evil/m/f").unwrap_err();
        assert_eq!(other.code(), "source_not_allowed");
        assert!(other.to_string().contains("`evil`"), "{other}");
        let url = |u: &str| Url::parse(u).unwrap();
        assert_eq!(
            p.check_url(hf, &url("https://huggingface.co/acme/m")),
            Ok(())
        );
        let cdn = p.check_url(hf, &url("https://cdn.example/x")).unwrap_err();
        assert_eq!(cdn.code(), "source_not_allowed");
        let https = p
            .check_org(SourceType::Https, "acme", "https://x/y")
            .unwrap_err();
        assert_eq!(https.code(), "source_not_allowed");
    }

    #[test]
    fn bucket_gates() {
        let p = policy(
            "[[policy.allow]]\nsource_type = 's3'\nbucket = 'models'\n\
             [[policy.allow]]\nsource_type = 's3'\nbucket = 'lab'\ninsecure_http = true\n\
             [[policy.allow]]\nsource_type = 'azure_blob'\naccount = 'acct'\ncontainer = 'w'\n\
             [[policy.allow]]\nsource_type = 'azure_blob'\naccount = 'open'\n",
        );
        let https = Url::parse("https://s3.example").unwrap();
        let http = Url::parse("http://127.0.0.1:9000").unwrap();
        let shown = Redacted::uri("s3://x/y");
        let check = |t, account, name, endpoint: &Url| {
            let bucket = Bucket { account, name };
            p.check_bucket(t, &bucket, endpoint, &shown)
                .map(|_| "ok")
                .unwrap_or_else(|e| e.code())
        };
        assert_eq!(check(SourceType::S3, None, "models", &https), "ok");
        assert_eq!(
            check(SourceType::S3, None, "models", &http),
            "insecure_source"
        );
        assert_eq!(check(SourceType::S3, None, "lab", &http), "ok");
        assert_eq!(
            check(SourceType::S3, None, "other", &https),
            "source_not_allowed"
        );
        assert_eq!(
            check(SourceType::Gcs, None, "models", &https),
            "source_not_allowed"
        );
        let ftp = Url::parse("ftp://s3.example").unwrap();
        assert_eq!(
            check(SourceType::S3, None, "models", &ftp),
            "source_not_allowed"
        );
        let azure = SourceType::AzureBlob;
        assert_eq!(check(azure, Some("acct"), "w", &https), "ok");
        assert_eq!(
            check(azure, Some("acct"), "x", &https),
            "source_not_allowed"
        );
        assert_eq!(
            check(azure, Some("other"), "w", &https),
            "source_not_allowed"
        );
        assert_eq!(check(azure, Some("open"), "any", &https), "ok");
    }

    #[test]
    fn an_empty_allowlist_denies_everything() {
        let p = policy("");
        assert!(
            p.check_url(
                SourceType::Https,
                &Url::parse("https://a.example/").unwrap()
            )
            .is_err()
        );
        assert!(
            p.check_source_type(SourceType::ArtifactStore, "artifact-store://k")
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn wildcard_matches_exactly_the_subdomains(label in "[a-z0-9]{1,10}", other in "[a-z0-9]{1,10}") {
            let below = format!("{label}.example.com");
            let glued = format!("{label}example.com");
            let beyond = format!("{label}.example.com.{other}");
            prop_assert!(host_matches("*.example.com", &below));
            prop_assert!(!host_matches("*.example.com", &glued));
            prop_assert!(!host_matches("*.example.com", &beyond));
            prop_assert!(!host_matches("*.example.com", "example.com"));
        }
    }
}
