//! Showing errors: one line with every cause, for the `error[...]` line and for log fields.

use std::error::Error;
use std::fmt;

/// Displays an error and its sources as `outer: inner: innermost` on one line, skipping a
/// source whose text its parent already contains.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        let mut source = self.0.source();
        while let Some(e) = source {
            let next = e.to_string();
            if !shown.contains(&next) {
                shown.push_str(": ");
                shown.push_str(&next);
            }
            source = e.source();
        }
        f.write_str(&shown.replace(['\n', '\r'], " "))
    }
}

/// The stable code of a failed file operation on the state dir: `disk_full` when no space or
/// quota is left, `state_dir_read_only` on a read-only filesystem, else `io_error`.
pub fn io_code(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => "disk_full",
        Some(libc::EROFS) => "state_dir_read_only",
        _ => "io_error",
    }
}

/// Whether `error` or one of its causes is an I/O error of `kind`. An `io::Error` that wraps
/// another error does not list it as its source, so the wrapped error is searched too.
pub fn has_io_kind(error: &(dyn Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let wrapped = io.get_ref().is_some_and(|inner| has_io_kind(inner, kind));
            if io.kind() == kind || wrapped {
                return true;
            }
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn shows_every_cause_on_one_line() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad\ncert",
        ));
        assert_eq!(Chain(&e).to_string(), "outer failed: bad cert");
        assert!(has_io_kind(&e, std::io::ErrorKind::InvalidData));
        assert!(!has_io_kind(&e, std::io::ErrorKind::TimedOut));
        let wrapped =
            std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, "x"));
        assert!(has_io_kind(
            &Outer(wrapped),
            std::io::ErrorKind::InvalidData
        ));
    }
}
