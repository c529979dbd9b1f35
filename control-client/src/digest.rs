//! Content digests as the control plane declares them: `<algorithm>:<lowercase hex>`.
//!
//! Parsing is strict on purpose: the digest is the only thing that ties bytes on a node to a
//! registration, so anything short of a well-formed digest of a declared algorithm is refused.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A hash algorithm the control plane may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The name used in digests and in the store's path (`blobs/<name>/<hex>`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex encoding of a digest of this algorithm.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated digest. The hex is always lowercase and of the algorithm's length.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    #[error("digest has no algorithm prefix (expected `sha256:<hex>`)")]
    MissingAlgorithm,
    #[error("digest algorithm `{0}` is not one of sha256, sha512")]
    UnknownAlgorithm(String),
    #[error("{algorithm} digest must be {expected} lowercase hex characters")]
    MalformedHex {
        algorithm: Algorithm,
        expected: usize,
    },
}

impl Digest {
    /// Builds a digest from raw hash output.
    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Self {
        use fmt::Write;
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            let _ = write!(hex, "{b:02x}");
        }
        debug_assert_eq!(hex.len(), algorithm.hex_len());
        Digest { algorithm, hex }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex of the hash, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, hex) = s.split_once(':').ok_or(DigestError::MissingAlgorithm)?;
        let algorithm = Algorithm::from_name(name)
            .ok_or_else(|| DigestError::UnknownAlgorithm(name.chars().take(32).collect()))?;
        let well_formed = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(DigestError::MalformedHex {
                algorithm,
                expected: algorithm.hex_len(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_declared_algorithms() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), format!("sha256:{}", "ab".repeat(32)));
        let d: Digest = format!("sha512:{}", "0f".repeat(64)).parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha512);
    }

    #[test]
    fn refuses_what_is_not_a_digest() {
        let hex = "ab".repeat(32);
        assert_eq!("".parse::<Digest>(), Err(DigestError::MissingAlgorithm));
        assert_eq!(hex.parse::<Digest>(), Err(DigestError::MissingAlgorithm));
        assert!(matches!(
            format!("md5:{hex}").parse::<Digest>(),
            Err(DigestError::UnknownAlgorithm(_))
        ));
        assert!(matches!(
            format!("SHA256:{hex}").parse::<Digest>(),
            Err(DigestError::UnknownAlgorithm(_))
        ));
        for bad in [
            &hex[..63],
            &format!("{hex}0"),
            &hex.to_uppercase(),
            &"zz".repeat(32),
        ] {
            assert!(
                matches!(
                    format!("sha256:{bad}").parse::<Digest>(),
                    Err(DigestError::MalformedHex { .. })
                ),
                "{bad} accepted"
            );
        }
        assert!(
            format!("sha512:{hex}").parse::<Digest>().is_err(),
            "short sha512 accepted"
        );
    }

    #[test]
    fn from_bytes_round_trips() {
        let d = Digest::from_bytes(Algorithm::Sha256, &[0xab; 32]);
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,140}") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s);
            }
        }
    }
}
