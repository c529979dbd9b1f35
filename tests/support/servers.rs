//! The real servers `.ci/test` starts for the integration tests (see `.ci/servers/`), found
//! through the environment variables it exports.
//!
//! A test that needs one asks [`server`]; when the variable is missing the test is skipped with
//! a message on stderr, except under `.ci/test`, which sets `TEST_SERVERS_REQUIRED=1`: then a
//! missing server fails the test, so CI never passes by skipping.

/// The value of `var` (an address or URL `.ci/test` exported), or `None` when the server is
/// not running and the test should return early.
pub fn server(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var("TEST_SERVERS_REQUIRED").as_deref() == Ok("1") => {
            panic!("{var} is not set: the server it names did not start (see .ci/servers/)")
        }
        _ => {
            eprintln!("skipped: {var} is not set; run the tests through .ci/test");
            None
        }
    }
}
