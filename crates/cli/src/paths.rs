//! The rule that no verb writes over one of its own inputs.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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

/// The inputs an adapter directory `dir` given as `flag` (`--adapter`) stands for: the
/// directory itself and every file PEFT's layout may hold there (`adapter_model.safetensors`,
/// `adapter_model.bin`, `adapter_config.json`), each with what it is, for [`refuse_overwrite`].
pub fn adapter_inputs(dir: &Path, flag: &str) -> Vec<(PathBuf, String)> {
    let mut inputs = vec![(dir.to_path_buf(), format!("the {flag} directory"))];
    for name in [
        nibble_nn::peft::WEIGHTS_FILE,
        nibble_nn::peft::WEIGHTS_FILE_PTH,
        nibble_nn::peft::CONFIG_FILE,
    ] {
        inputs.push((dir.join(name), format!("{flag}'s {name}")));
    }
    inputs
}

/// [`refuse_overwrite`] for inputs held as owned paths and descriptions (e.g. from
/// [`adapter_inputs`]).
pub fn refuse_overwrite_owned(output: &Path, inputs: &[(PathBuf, String)]) -> Result<()> {
    let refs: Vec<(&Path, &str)> = inputs
        .iter()
        .map(|(p, what)| (p.as_path(), what.as_str()))
        .collect();
    refuse_overwrite(output, &refs)
}
