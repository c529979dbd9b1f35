//! Short-lived credentials the control plane issues for one artifact and one intent.
//!
//! They live in memory only. `Debug` is written by hand so that no secret can reach a log line
//! through `{:?}`; nothing here implements `Display` or `Serialize` for the same reason.

use std::fmt;
use std::time::SystemTime;

use serde::Deserialize;

/// What the node means to do with the credentials it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Intent {
    Pull,
}

impl Intent {
    pub fn name(self) -> &'static str {
        match self {
            Intent::Pull => "pull",
        }
    }
}

/// Credentials for one source, or `None` for public objects.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Credential {
    None,
    Aws {
        access_key_id: String,
        secret_access_key: String,
        #[serde(default)]
        session_token: Option<String>,
        #[serde(with = "rfc3339")]
        expires_at: SystemTime,
    },
    Bearer {
        token: String,
        #[serde(default, with = "rfc3339_opt")]
        expires_at: Option<SystemTime>,
    },
    AzureSas {
        sas: String,
        #[serde(with = "rfc3339")]
        expires_at: SystemTime,
    },
}

impl Credential {
    /// When the credential stops working; `None` when it does not expire.
    pub fn expires_at(&self) -> Option<SystemTime> {
        match self {
            Credential::None => None,
            Credential::Aws { expires_at, .. } | Credential::AzureSas { expires_at, .. } => {
                Some(*expires_at)
            }
            Credential::Bearer { expires_at, .. } => *expires_at,
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Credential::None => return f.write_str("Credential::None"),
            Credential::Aws { .. } => "Aws",
            Credential::Bearer { .. } => "Bearer",
            Credential::AzureSas { .. } => "AzureSas",
        };
        f.debug_struct(&format!("Credential::{kind}"))
            .field("secret", &"<redacted>")
            .field(
                "expires_at",
                &self.expires_at().map(humantime::format_rfc3339_seconds),
            )
            .finish()
    }
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)
    }
}

mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_secret() {
        let creds = [
            r#"{"kind":"aws","access_key_id":"AKIASENTINEL","secret_access_key":"SENTINEL-SECRET","session_token":"SENTINEL-TOKEN","expires_at":"2026-12-03T18:00:00Z"}"#,
            r#"{"kind":"bearer","token":"SENTINEL-TOKEN"}"#,
            r#"{"kind":"azure_sas","sas":"sv=1&sig=SENTINEL","expires_at":"2026-12-03T18:00:00Z"}"#,
        ];
        for json in creds {
            let c: Credential = serde_json::from_str(json).unwrap();
            let shown = format!("{c:?} {c:#?}");
            assert!(!shown.contains("SENTINEL"), "{shown}");
            assert!(shown.contains("redacted"));
        }
    }

    #[test]
    fn parses_expiry_and_refuses_unknown_kinds() {
        let c: Credential = serde_json::from_str(
            r#"{"kind":"azure_sas","sas":"x","expires_at":"2026-12-03T18:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            c.expires_at(),
            Some(humantime::parse_rfc3339("2026-12-03T18:00:00Z").unwrap())
        );
        assert!(serde_json::from_str::<Credential>(r#"{"kind":"password","p":"x"}"#).is_err());
        assert!(serde_json::from_str::<Credential>(r#"{"kind":"none"}"#).is_ok());
    }
}
