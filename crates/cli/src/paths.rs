//! The rule that no verb writes over one of its own inputs.

use crate::error::{Error, Result};
use std::path::Path;

/// True when `a` and `b` name the same existing file (same device and inode on Unix, same
/// canonical path elsewhere); false when either does not exist.
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = (&ma, &mb);
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        )
    }
}

/// An error if `output` is any of `inputs` (each given with what it is, e.g. `"--model"`).
pub fn refuse_overwrite(output: &Path, inputs: &[(&Path, &str)]) -> Result<()> {
    match inputs.iter().find(|(input, _)| same_file(output, input)) {
        Some((input, what)) => Err(Error::WouldOverwrite {
            path: output.to_path_buf(),
            what: format!("it is {what} {}", input.display()),
        }),
        None => Ok(()),
    }
}
