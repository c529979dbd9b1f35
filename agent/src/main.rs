//! The `blobstage` binary: everything it does lives in the library's `cli` module.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    blobstage::cli::main()
}
