//! The `huggingface` source: one file of a Hugging Face Hub repository,
//! `hf://[datasets/|spaces/]org/repo[@revision]/path`, through the Hub's resolve protocol.
//!
//! `stat` is the Hub's resolve request: a `HEAD` of
//! `{endpoint}/{type prefix}{org}/{repo}/resolve/{revision}/{path}` with the token, following
//! redirects that stay on the Hub's origin (a renamed repository) and stopping at the first one
//! that leaves it. That answer describes the file: `X-Repo-Commit` (required), `X-Linked-Etag`
//! (for an LFS file, its sha256; else `ETag`), `X-Linked-Size` (else `Content-Length`), and
//! `Location`, the short-lived signed CDN URL the bytes come from. A small file the Hub serves
//! itself has no `Location`; its bytes come from the Hub, at the resolved commit.
//!
//! The commit pins the transfer. It is part of the validator, so the resume journal records
//! it, and every later request names the commit, never the branch: the re-resolve after an
//! expired signed URL, and the resolve of a resumed transfer, which is offered the journal's
//! version before `stat` ([`Source::prefer_version`]). Ranged reads go to the signed URL with
//! no `Authorization` (the token goes only to the endpoint's origin). A 403 there is an expired
//! signature: it gets one re-resolve pinned to the commit and one retry of that range only.
//! Every URL contacted passes the node allowlist (the hosts of `huggingface` entries), and every
//! Hub URL of a repository its organisation too (`org` entries), redirects included.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use control_client::{BoxFuture, Credentials, Digest, SourceType};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use reqwest::header::{self, HeaderMap};
use reqwest::{Response, StatusCode};
use tracing::{debug, warn};
use url::Url;

use super::http::{
    Exchange, Redirects, body_stream, check_range, content_length, protocol, ranged_get,
    redirect_target, same_origin, status_error, text,
};
use super::{ByteStream, ObjectInfo, Source, SourceError, Validator};
use crate::policy::Policy;
use crate::redact::Redacted;

/// The revision of a URI that names none.
const DEFAULT_REVISION: &str = "main";

/// What stays unescaped in a revision (one path segment): `refs/pr/1` is `refs%2Fpr%2F1`.
const REVISION: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What stays unescaped in a file path inside a repository: the same, and `/`.
const FILE_PATH: &AsciiSet = &REVISION.remove(b'/');

/// The kinds of repository, by the prefix their Hub URLs and `hf://` URIs carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RepoKind {
    Model,
    Dataset,
    Space,
}

impl RepoKind {
    fn prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
            RepoKind::Space => "spaces/",
        }
    }

    /// Splits the kind's prefix off `rest`; no prefix is a model.
    fn split(rest: &str) -> (RepoKind, &str) {
        for kind in [RepoKind::Dataset, RepoKind::Space] {
            if let Some(after) = rest.strip_prefix(kind.prefix()) {
                return (kind, after);
            }
        }
        (RepoKind::Model, rest)
    }
}

/// An `hf://` URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubFile {
    kind: RepoKind,
    pub(crate) org: String,
    pub(crate) name: String,
    /// The revision written after `@`, decoded; `None` when the URI names none.
    pub(crate) revision: Option<String>,
    /// The file's path inside the repository, as written.
    pub(crate) path: String,
}

impl HubFile {
    pub(crate) fn parse(uri: &str) -> Result<HubFile, String> {
        let rest = uri
            .strip_prefix("hf://")
            .ok_or("a huggingface uri starts with hf://")?;
        if rest.contains(['?', '#']) || rest.chars().any(char::is_control) {
            return Err("an hf:// uri has no query, fragment or control character".into());
        }
        let (kind, rest) = RepoKind::split(rest);
        let (org, rest) = rest.split_once('/').ok_or("no org/repo in the uri")?;
        let end = rest
            .find(['@', '/'])
            .ok_or("no file path after the repository")?;
        let (name, rest) = rest.split_at(end);
        let (revision, path) = match rest.strip_prefix('@') {
            Some(after) => {
                let (revision, path) = split_revision(after)?;
                (Some(revision), path)
            }
            None => (None, &rest[1..]),
        };
        for (what, part) in [("org", org), ("repository", name)] {
            check_name(what, part)?;
        }
        check_path(path)?;
        Ok(HubFile {
            kind,
            org: org.to_owned(),
            name: name.to_owned(),
            revision,
            path: path.to_owned(),
        })
    }

    /// `{type prefix}{org}/{repo}`, as Hub URLs spell it.
    pub(crate) fn repo(&self) -> String {
        format!("{}{}/{}", self.kind.prefix(), self.org, self.name)
    }
}

/// Splits `revision/path` after the `@`. `refs/pr/N` and `refs/convert/NAME` may be written
/// as they are; any other revision is one segment, percent-encoded if it holds a `/`.
fn split_revision(after: &str) -> Result<(String, &str), String> {
    let special = ["refs/pr/", "refs/convert/"].iter().find_map(|prefix| {
        let rest = after.strip_prefix(prefix)?;
        let end = rest.find('/')?;
        let name = &rest[..end];
        let digits = *prefix == "refs/pr/";
        let valid = !name.is_empty()
            && name.bytes().all(|b| match digits {
                true => b.is_ascii_digit(),
                false => b.is_ascii_alphanumeric() || b"_.-".contains(&b),
            });
        valid.then(|| prefix.len() + end)
    });
    let end = match special {
        Some(end) => end,
        None => after.find('/').ok_or("no file path after the revision")?,
    };
    let revision = percent_decode_str(&after[..end])
        .decode_utf8()
        .map_err(|_| "the revision is not UTF-8 once decoded")?;
    if revision.is_empty() || revision.chars().any(char::is_control) {
        return Err("the revision is empty or holds a control character".into());
    }
    // Git allows no such ref, and in the resolve URL a `.` or `..` segment would be taken as a
    // path step, naming another file than the one registered.
    if revision.split('/').any(|s| s == "." || s == "..") {
        return Err("the revision has a . or .. segment".into());
    }
    Ok((revision.into_owned(), &after[end + 1..]))
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    match valid {
        true => Ok(()),
        false => Err(format!(
            "the {what} name must be letters, digits, '-', '_' or '.'"
        )),
    }
}

fn check_path(path: &str) -> Result<(), String> {
    let bad = path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..");
    match bad {
        true => Err("the file path is empty or has an empty, '.' or '..' segment".into()),
        false => Ok(()),
    }
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_sha256(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The revision to resolve and the commit the registration pins, from the URI and the
/// registration's `source_ref`. A `source_ref` commit is checked against what the URI's
/// revision resolves to; a `source_ref` branch or tag stands in for a URI that names none.
///
/// Limitation: only a full 40-hex `source_ref` pins a commit; a shorter one is taken as a
/// revision name and resolved like a branch.
fn revision_of(
    file: &HubFile,
    source_ref: Option<&str>,
) -> Result<(String, Option<String>), String> {
    let named = file.revision.clone();
    match source_ref {
        None => Ok((named.unwrap_or_else(|| DEFAULT_REVISION.into()), None)),
        Some(commit) if is_commit(commit) => {
            Ok((named.unwrap_or_else(|| commit.into()), Some(commit.into())))
        }
        Some(reference) => match named {
            None => Ok((reference.into(), None)),
            Some(named) if named == reference => Ok((named, None)),
            Some(named) => Err(format!(
                "source_ref names revision `{reference}` but the uri names `{named}`"
            )),
        },
    }
}

/// `{endpoint}/{repo}/resolve/{revision}/{path}`, revision and path percent-encoded.
pub(crate) fn resolve_url(endpoint: &Url, repo: &str, revision: &str, path: &str) -> Url {
    let base = endpoint.as_str().trim_end_matches('/');
    let revision = utf8_percent_encode(revision, REVISION);
    let path = utf8_percent_encode(path, FILE_PATH);
    let url = format!("{base}/{repo}/resolve/{revision}/{path}");
    Url::parse(&url).expect("an endpoint URL with a valid path stays a URL")
}

/// A Hub URL of a repository's file, read back: the repository (`datasets/org/name`), its
/// organisation, and the file path after the revision, as encoded in the URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResolvePath<'a> {
    pub(crate) repo: &'a str,
    pub(crate) org: &'a str,
    pub(crate) file: &'a str,
}

pub(crate) fn resolve_path<'a>(endpoint: &Url, url: &'a Url) -> Option<ResolvePath<'a>> {
    if !same_origin(url, endpoint) {
        return None;
    }
    let base = endpoint.path().trim_end_matches('/');
    let rest = url.path().strip_prefix(base)?.strip_prefix('/')?;
    let (kind, after_kind) = RepoKind::split(rest);
    let mut parts = after_kind.splitn(5, '/');
    let (org, name) = (parts.next()?, parts.next()?);
    if parts.next()? != "resolve" || org.is_empty() || name.is_empty() {
        return None;
    }
    let _revision = parts.next().filter(|r| !r.is_empty())?;
    let file = parts.next().filter(|f| !f.is_empty())?;
    let repo_len = kind.prefix().len() + org.len() + 1 + name.len();
    Some(ResolvePath {
        repo: &rest[..repo_len],
        org,
        file,
    })
}

/// An ETag as the Hub client reads it: without `W/` and quotes.
fn normalize_etag(etag: &str) -> String {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.trim_matches('"').to_owned()
}

/// What the Hub said of the file at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    commit: String,
    /// The LFS sha256, or the Hub's ETag of a file it serves itself.
    etag: String,
    /// The LFS sha256, when the Hub announced one.
    lfs_sha256: Option<String>,
    size: u64,
    /// Where the bytes come from: the signed CDN URL, or the Hub URL at the commit.
    location: Url,
}

impl Resolved {
    fn validator(&self) -> Validator {
        Validator::Opaque(format!("hf commit={} etag={}", self.commit, self.etag))
    }
}

/// The commit a validator of this source names.
fn commit_of(validator: &Validator) -> Option<&str> {
    let Validator::Opaque(text) = validator else {
        return None;
    };
    let rest = text.strip_prefix("hf commit=")?;
    let (commit, _etag) = rest.split_once(" etag=")?;
    is_commit(commit).then_some(commit)
}

pub struct HuggingfaceSource {
    client: reqwest::Client,
    policy: Arc<Policy>,
    credentials: Credentials,
    /// The Hub; the token is sent to its origin only.
    endpoint: Url,
    /// The registered URI, shown in errors.
    uri: String,
    file: HubFile,
    /// The revision asked for: the URI's, else `source_ref`, else `main`.
    revision: String,
    /// The commit the registration's `source_ref` pins, which the resolve must confirm.
    pinned_commit: Option<String>,
    /// The commit an interrupted run of this transfer used, offered before `stat`.
    preferred: Mutex<Option<String>>,
    resolved: Mutex<Option<Resolved>>,
    /// One re-resolve at a time when signed URLs expire; the others wait and use its answer.
    renewing: tokio::sync::Mutex<()>,
}

impl fmt::Debug for HuggingfaceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HuggingfaceSource")
            .field("uri", &Redacted::uri(&self.uri))
            .field("endpoint", &Redacted::url(&self.endpoint))
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl HuggingfaceSource {
    /// Checks the URI, the endpoint's host and the repository's organisation against policy;
    /// makes no request.
    pub fn new(
        uri: &str,
        source_ref: Option<&str>,
        endpoint: Url,
        credentials: Credentials,
        policy: Arc<Policy>,
        client: reqwest::Client,
    ) -> Result<Self, SourceError> {
        let invalid = |reason| SourceError::InvalidUri {
            uri: Redacted::uri(uri),
            reason,
        };
        let file = HubFile::parse(uri).map_err(invalid)?;
        let (revision, pinned_commit) = revision_of(&file, source_ref).map_err(invalid)?;
        policy.check_url(SourceType::Huggingface, &endpoint)?;
        policy.check_org(SourceType::Huggingface, &file.org, uri)?;
        Ok(HuggingfaceSource {
            client,
            policy,
            credentials,
            endpoint,
            uri: uri.to_owned(),
            file,
            revision,
            pinned_commit,
            preferred: Mutex::default(),
            resolved: Mutex::default(),
            renewing: tokio::sync::Mutex::default(),
        })
    }

    /// The gate of every URL: its host, and for a Hub URL of a repository, its organisation.
    fn admit(&self, url: &Url) -> Result<(), SourceError> {
        self.policy.check_url(SourceType::Huggingface, url)?;
        if let Some(path) = resolve_path(&self.endpoint, url) {
            self.policy
                .check_org(SourceType::Huggingface, path.org, url.as_str())?;
        }
        Ok(())
    }

    fn exchange<'a>(&'a self, redirects: Redirects, admit: super::http::Admit<'a>) -> Exchange<'a> {
        Exchange {
            credentials: &self.credentials,
            token_origin: &self.endpoint,
            redirects,
            admit,
        }
    }

    /// The resolve request for `revision`.
    async fn resolve(&self, revision: &str) -> Result<Resolved, SourceError> {
        let start = resolve_url(&self.endpoint, &self.file.repo(), revision, &self.file.path);
        let admit = |url: &Url| self.admit(url);
        let head = |url: &Url| {
            self.client
                .head(url.clone())
                .header(header::ACCEPT_ENCODING, "identity")
        };
        let (url, response) = self
            .exchange(Redirects::SameOrigin, &admit)
            .send(start, head)
            .await?;
        let resolved = self.described(&url, &response)?;
        self.admit(&resolved.location)?;
        Ok(resolved)
    }

    /// Reads the resolve answer's headers.
    ///
    /// Limitation: the Xet headers (`X-Xet-Hash`) are not read; a Xet-backed file comes through
    /// the Hub's redirect to a signed URL like any LFS file, not by the Xet chunk protocol.
    fn described(&self, url: &Url, response: &Response) -> Result<Resolved, SourceError> {
        let uri = Redacted::url(url);
        let status = response.status();
        if !status.is_success() && !status.is_redirection() {
            return Err(refusal(&uri, status, response.headers()));
        }
        let headers = response.headers();
        let commit = text(headers, "x-repo-commit")
            .filter(|c| is_commit(c))
            .ok_or_else(|| protocol(&uri, "no X-Repo-Commit: not a Hugging Face Hub answer"))?;
        let linked = text(headers, "x-linked-etag").map(normalize_etag);
        let etag = linked
            .clone()
            .or_else(|| text(headers, header::ETAG).map(normalize_etag))
            .filter(|e| !e.is_empty())
            .ok_or_else(|| protocol(&uri, "the resolve answer has no ETag"))?;
        let size = match text(headers, "x-linked-size") {
            Some(size) => size.parse().ok(),
            None if status.is_redirection() => None,
            None => content_length(headers),
        };
        let size = size.ok_or_else(|| protocol(&uri, "the resolve answer has no size"))?;
        let location = match headers.get(header::LOCATION) {
            Some(location) if status.is_redirection() => redirect_target(url, location)?,
            None if status.is_redirection() => {
                return Err(protocol(&uri, "a redirect without Location"));
            }
            _ => self.at_commit(url, commit),
        };
        Ok(Resolved {
            commit: commit.to_owned(),
            lfs_sha256: linked.filter(|e| is_sha256(e)),
            etag,
            size,
            location,
        })
    }

    /// The Hub URL of the file that answered `url`, at `commit` instead of its revision.
    fn at_commit(&self, url: &Url, commit: &str) -> Url {
        match resolve_path(&self.endpoint, url) {
            Some(path) => {
                let file = percent_decode_str(path.file).decode_utf8_lossy();
                resolve_url(&self.endpoint, path.repo, commit, &file)
            }
            None => url.clone(),
        }
    }

    /// The commit of an interrupted run, unless the registration pins another one.
    fn preferred_commit(&self) -> Option<String> {
        let preferred = self.preferred.lock().expect("preferred lock").clone()?;
        match &self.pinned_commit {
            Some(pinned) if *pinned != preferred => None,
            _ => Some(preferred),
        }
    }

    /// Resolves what `stat` asks for, and says what that was: the commit of an interrupted run
    /// first, and the revision when there is none, or the Hub no longer has it (its history was
    /// rewritten): the journal then no longer matches, and the transfer starts clean.
    async fn resolve_for_stat(&self) -> Result<(String, Resolved), SourceError> {
        if let Some(commit) = self.preferred_commit() {
            match self.resolve(&commit).await {
                Err(SourceError::NotFound { .. }) => {
                    warn!(%commit, "the Hub no longer has the commit of the interrupted run");
                }
                resolved => return Ok((commit, resolved?)),
            }
        }
        let resolved = self.resolve(&self.revision).await?;
        Ok((self.revision.clone(), resolved))
    }

    fn current(&self) -> Option<Resolved> {
        self.resolved.lock().expect("resolved lock").clone()
    }

    fn check_commit(&self, asked: &str, resolved: &Resolved) -> Result<(), SourceError> {
        let expected = self
            .pinned_commit
            .as_deref()
            .or_else(|| is_commit(asked).then_some(asked));
        match expected {
            Some(expected) if expected != resolved.commit => Err(SourceError::RefMismatch {
                uri: Redacted::uri(&self.uri),
                registered: expected.to_owned(),
                resolved: resolved.commit.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// A ranged GET of the file's bytes at `location`.
    async fn get(
        &self,
        location: &Url,
        range: Option<(u64, u64)>,
    ) -> Result<(Url, Response), SourceError> {
        let admit = |url: &Url| self.admit(url);
        self.exchange(Redirects::All, &admit)
            .send(location.clone(), |url| ranged_get(&self.client, url, range))
            .await
    }

    /// A fresh signed URL for the commit of `stale`, unless another range already got one.
    async fn renew(&self, stale: &Resolved) -> Result<Resolved, SourceError> {
        let _one_at_a_time = self.renewing.lock().await;
        if let Some(current) = self.current().filter(|c| c.location != stale.location) {
            return Ok(current);
        }
        warn!(commit = %stale.commit, "the signed URL was refused (expired); resolving the commit again");
        let fresh = self.resolve(&stale.commit).await?;
        self.check_commit(&stale.commit, &fresh)?;
        if fresh.validator() != stale.validator() || fresh.size != stale.size {
            let reason = "the file at the pinned commit is not the one seen at the start";
            return Err(super::http::changed(&Redacted::uri(&self.uri), reason));
        }
        *self.resolved.lock().expect("resolved lock") = Some(fresh.clone());
        Ok(fresh)
    }
}

/// A signed URL that no longer works: a 403 from anywhere but the Hub itself.
fn expired_signature(endpoint: &Url, url: &Url, response: &Response) -> bool {
    response.status() == StatusCode::FORBIDDEN && !same_origin(url, endpoint)
}

/// The error of a resolve answer that is not the file.
fn refusal(uri: &Redacted, status: StatusCode, headers: &HeaderMap) -> SourceError {
    let reason = match text(headers, "x-error-code") {
        Some("GatedRepo") => "the repository is gated, and the token has not been granted access",
        _ => "the repository is private or does not exist, or the token has no access to it",
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => SourceError::Unauthorized {
            uri: uri.clone(),
            status: status.as_u16(),
            reason,
        },
        status => status_error(uri, status, headers),
    }
}

impl Source for HuggingfaceSource {
    fn uri(&self) -> Redacted {
        Redacted::uri(&self.uri)
    }

    fn stat(&self) -> BoxFuture<'_, Result<ObjectInfo, SourceError>> {
        Box::pin(async move {
            let (revision, resolved) = self.resolve_for_stat().await?;
            self.check_commit(&revision, &resolved)?;
            let from = Redacted::url(&resolved.location);
            debug!(%revision, commit = %resolved.commit, %from, "resolved on the Hub");
            let info = ObjectInfo {
                size: resolved.size,
                validator: Some(resolved.validator()),
                ranges: true,
            };
            *self.resolved.lock().expect("resolved lock") = Some(resolved);
            Ok(info)
        })
    }

    fn read<'a>(
        &'a self,
        range: Option<Range<u64>>,
        pinned: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<ByteStream, SourceError>> {
        Box::pin(async move {
            let resolved = self
                .current()
                .filter(|r| Some(r.validator()) == pinned.validator)
                .ok_or_else(|| {
                    let reason = "the read is not for the commit resolved at stat";
                    super::http::changed(&Redacted::uri(&self.uri), reason)
                })?;
            let wanted = range.clone().map(|r| (r.start, r.end - 1));
            let (mut url, mut response) = self.get(&resolved.location, wanted).await?;
            // Limitation: one renewal per read. A renewed URL that is refused again (it
            // expired before this range used it) fails the transfer with `source_denied`.
            if expired_signature(&self.endpoint, &url, &response) {
                let fresh = self.renew(&resolved).await?;
                (url, response) = self.get(&fresh.location, wanted).await?;
            }
            let uri = Redacted::url(&url);
            check_range(&response, range, pinned.size, &uri)?;
            Ok(body_stream(response, uri))
        })
    }

    fn prefer_version(&self, earlier: &Validator) {
        if let Some(commit) = commit_of(earlier) {
            *self.preferred.lock().expect("preferred lock") = Some(commit.to_owned());
        }
    }

    fn announced_digest(&self) -> Option<Digest> {
        let sha256 = self.current()?.lfs_sha256?;
        format!("sha256:{sha256}").parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(uri: &str) -> Result<(RepoKind, String, String, Option<String>, String), String> {
        HubFile::parse(uri).map(|f| (f.kind, f.org, f.name, f.revision, f.path))
    }

    #[test]
    fn uri_forms() {
        let model = parsed("hf://acme/llama@main/weights/model.safetensors").unwrap();
        assert_eq!(
            model,
            (
                RepoKind::Model,
                "acme".into(),
                "llama".into(),
                Some("main".into()),
                "weights/model.safetensors".into()
            )
        );
        let dataset = parsed("hf://datasets/acme/corpus/train.parquet").unwrap();
        assert_eq!((dataset.0, dataset.3), (RepoKind::Dataset, None));
        let space = parsed("hf://spaces/acme/demo@v1.0/app.py").unwrap();
        assert_eq!(
            (space.0, space.3.as_deref()),
            (RepoKind::Space, Some("v1.0"))
        );
        let pr = parsed("hf://acme/llama@refs/pr/12/config.json").unwrap();
        assert_eq!(
            (pr.3.as_deref(), pr.4.as_str()),
            (Some("refs/pr/12"), "config.json")
        );
        let encoded = parsed("hf://acme/llama@refs%2Fpr%2F12/config.json").unwrap();
        assert_eq!(encoded.3.as_deref(), Some("refs/pr/12"));
        let convert = parsed("hf://datasets/acme/c@refs/convert/parquet/a/b.parquet").unwrap();
        assert_eq!(
            (convert.3.as_deref(), convert.4.as_str()),
            (Some("refs/convert/parquet"), "a/b.parquet")
        );
        let branch_with_slash = parsed("hf://acme/llama@feature%2Fx/f").unwrap();
        assert_eq!(branch_with_slash.3.as_deref(), Some("feature/x"));
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "https://huggingface.co/acme/llama/resolve/main/f",
            "hf://acme/llama",
            "hf://acme/llama@main",
            "hf://acme/llama/",
            "hf://acme//f",
            "hf:///llama/f",
            "hf://acme/llama/../secrets",
            "hf://acme/llama/a//b",
            "hf://acme/llama@/f",
            "hf://acme/llama/f?x=1",
            "hf://acme/ll ama/f",
            "hf://ac/me@main/f/..",
            "hf://datasets/acme",
            "hf://acme/llama@./f",
            "hf://acme/llama@..%2Fmain/f",
            "hf://acme/llama@feature%2F../f",
        ] {
            assert!(HubFile::parse(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn resolve_urls_encode_the_revision_and_keep_the_path() {
        let endpoint = Url::parse("https://huggingface.co").unwrap();
        let url = resolve_url(&endpoint, "acme/llama", "refs/pr/1", "dir/a b.bin");
        assert_eq!(
            url.as_str(),
            "https://huggingface.co/acme/llama/resolve/refs%2Fpr%2F1/dir/a%20b.bin"
        );
        let mirror = Url::parse("http://127.0.0.1:8080/hub/").unwrap();
        let url = resolve_url(&mirror, "datasets/acme/c", "main", "x.parquet");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/hub/datasets/acme/c/resolve/main/x.parquet"
        );
        assert_eq!(
            resolve_path(&mirror, &url),
            Some(ResolvePath {
                repo: "datasets/acme/c",
                org: "acme",
                file: "x.parquet"
            })
        );
        let elsewhere = Url::parse("http://127.0.0.1:9/hub/acme/c/resolve/main/x").unwrap();
        assert_eq!(resolve_path(&mirror, &elsewhere), None);
        let not_a_file = Url::parse("http://127.0.0.1:8080/hub/api/models/acme/c").unwrap();
        assert_eq!(resolve_path(&mirror, &not_a_file), None);
    }

    #[test]
    fn source_ref_pins_or_names_the_revision() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let file = |uri: &str| HubFile::parse(uri).unwrap();
        let bare = file("hf://acme/llama/f");
        let on_main = file("hf://acme/llama@main/f");
        assert_eq!(revision_of(&bare, None).unwrap(), ("main".into(), None));
        assert_eq!(
            revision_of(&bare, Some(commit)).unwrap(),
            (commit.into(), Some(commit.into()))
        );
        assert_eq!(
            revision_of(&on_main, Some(commit)).unwrap(),
            ("main".into(), Some(commit.into()))
        );
        assert_eq!(revision_of(&bare, Some("v2")).unwrap(), ("v2".into(), None));
        assert_eq!(
            revision_of(&on_main, Some("main")).unwrap(),
            ("main".into(), None)
        );
        assert!(revision_of(&on_main, Some("v2")).is_err());
    }

    #[test]
    fn the_validator_carries_the_commit() {
        let resolved = Resolved {
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            etag: "ab".repeat(32),
            lfs_sha256: Some("ab".repeat(32)),
            size: 3,
            location: Url::parse("https://cdn.example/x").unwrap(),
        };
        assert_eq!(
            commit_of(&resolved.validator()),
            Some(resolved.commit.as_str())
        );
        assert_eq!(commit_of(&Validator::ETag("\"x\"".into())), None);
        assert_eq!(
            commit_of(&Validator::Opaque("hf commit=main etag=x".into())),
            None
        );
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "hf://\\PC{0,60}") {
            let _ = HubFile::parse(&s);
        }

        #[test]
        fn any_revision_round_trips_through_the_resolve_url(
            revision in "[a-zA-Z0-9/._ -]{1,20}",
            path in "[a-z0-9]{1,8}(/[a-z0-9._-]{1,8}){0,3}",
        ) {
            prop_assume!(!path.split('/').any(|s| s == "." || s == ".."));
            prop_assume!(!revision.split('/').any(|s| s == "." || s == ".."));
            let encoded = utf8_percent_encode(&revision, REVISION).to_string();
            let uri = format!("hf://acme/repo@{encoded}/{path}");
            let file = HubFile::parse(&uri).unwrap();
            prop_assert_eq!(file.revision.as_deref(), Some(revision.as_str()));
            prop_assert_eq!(&file.path, &path);
            let endpoint = Url::parse("https://hub.example").unwrap();
            let url = resolve_url(&endpoint, &file.repo(), &revision, &file.path);
            let back = resolve_path(&endpoint, &url).unwrap();
            prop_assert_eq!(back.org, "acme");
            prop_assert_eq!(back.repo, "acme/repo");
        }
    }
}
