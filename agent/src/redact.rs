//! Redaction of URIs shown to users: no query string (signed URLs carry their signature there),
//! no userinfo, no fragment.

use std::fmt;

use url::Url;

/// A URI safe to print in logs, errors and events.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    pub fn url(url: &Url) -> Self {
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        let had_query = shown.query().is_some();
        shown.set_query(None);
        shown.set_fragment(None);
        let mut text = shown.to_string();
        if had_query {
            text.push_str("?<redacted>");
        }
        Redacted(text)
    }

    /// Redacts a URI that may not parse as a URL; anything after `?` or `#` is dropped.
    pub fn uri(uri: &str) -> Self {
        match Url::parse(uri) {
            Ok(url) => Redacted::url(&url),
            Err(_) => {
                let end = uri.find(['?', '#']).unwrap_or(uri.len());
                let shown: String = without_userinfo(&uri[..end])
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(256)
                    .collect();
                Redacted(shown)
            }
        }
    }
}

/// `text` without what a URI parser could take for userinfo: anything up to the last `@` of
/// the authority (after `scheme:` and an optional `//`, up to the first `/`).
fn without_userinfo(text: &str) -> String {
    let Some(colon) = text.find(':') else {
        return text.to_owned();
    };
    let rest = text[colon + 1..].trim_start_matches('/');
    let prefix = &text[..text.len() - rest.len()];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{prefix}{}", &rest[at + 1..]),
        None => text.to_owned(),
    }
}

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_that_does_not_parse_loses_its_userinfo_too() {
        for (uri, shown) in [
            ("http://user:pw@qil]es/a?x", "http://qil]es/a"),
            ("s3://user:SECRET42@/models/w.bin", "s3:///models/w.bin"),
            ("https:user@host]/p", "https:host]/p"),
            ("not a url", "not a url"),
            ("x://a/b@c", "x://a/b@c"),
        ] {
            assert_eq!(Redacted::uri(uri).to_string(), shown, "{uri}");
        }
    }

    #[test]
    fn strips_userinfo_query_and_fragment() {
        let url =
            Url::parse("https://u:secret@cdn.example/a/b?X-Amz-Signature=SECRET#frag").unwrap();
        let shown = Redacted::url(&url).to_string();
        assert_eq!(shown, "https://cdn.example/a/b?<redacted>");
        assert_eq!(
            Redacted::uri("not a url?sig=SECRET").to_string(),
            "not a url"
        );
    }
}
