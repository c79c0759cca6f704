//! No verb writes over one of its own inputs: outputs are compared with inputs as the files
//! they name (canonical paths, and on Unix the same device and inode, so a symlink or a hard
//! link to an input is caught too).

use crate::adapter::{CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};
use nibble_nn::peft::WEIGHTS_FILE_PTH;
use std::path::{Path, PathBuf};

/// A file a verb reads or writes, with the option that named it (for the message).
#[derive(Debug, Clone)]
pub struct NamedPath {
    /// The option, e.g. `--weights`.
    pub option: &'static str,
    /// The path as given.
    pub path: PathBuf,
}

impl NamedPath {
    /// `path`, named by `option`.
    pub fn new(option: &'static str, path: &Path) -> Self {
        NamedPath {
            option,
            path: path.to_path_buf(),
        }
    }

    /// The files of a PEFT adapter directory named by `option` (or the file itself where
    /// `dir` is a state-dict file of adapters): `adapter_model.safetensors`,
    /// `adapter_config.json`, and `adapter_model.bin`, which the loader reads where the
    /// safetensors file is absent.
    pub fn adapter_files(option: &'static str, dir: &Path) -> Vec<Self> {
        if dir.is_file() {
            // A state dict holding the adapters (`--adapter qlora.pth`).
            return vec![NamedPath::new(option, dir)];
        }
        [WEIGHTS_FILE, CONFIG_FILE, WEIGHTS_FILE_PTH]
            .iter()
            .map(|f| NamedPath::new(option, &dir.join(f)))
            .collect()
    }
}

/// The path with every existing part resolved: the whole path if it exists, else its
/// canonical parent joined with its file name (an output not yet written).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or(absolute.clone()),
        _ => absolute,
    }
}

/// True when `a` and `b` name the same file (the same canonical path, or on Unix the same
/// device and inode: a symlink or a hard link to it).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    if resolved(a) == resolved(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    false
}

/// An error if any of `outputs` is one of `inputs`.
pub fn check_no_overwrite(inputs: &[NamedPath], outputs: &[NamedPath]) -> Result<()> {
    for out in outputs {
        if let Some(input) = inputs.iter().find(|i| same_file(&i.path, &out.path)) {
            return Err(Error::Input {
                what: format!(
                    "{} {} is the input {} {}: refusing to write over an input (choose another output)",
                    out.option,
                    out.path.display(),
                    input.option,
                    input.path.display()
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_under_other_names_is_caught() {
        let dir = std::env::temp_dir().join(format!("nibble-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let file = dir.join("w.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let input = [NamedPath::new("--weights", &file)];
        let dotted = dir.join("sub/../w.safetensors");
        let e = check_no_overwrite(&input, &[NamedPath::new("--output", &dotted)]).unwrap_err();
        assert!(e.to_string().contains("--weights"), "{e}");
        #[cfg(unix)]
        {
            let link = dir.join("link.safetensors");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            assert!(check_no_overwrite(&input, &[NamedPath::new("--output", &link)]).is_err());
            let hard = dir.join("hard.safetensors");
            std::fs::hard_link(&file, &hard).unwrap();
            assert!(check_no_overwrite(&input, &[NamedPath::new("--output", &hard)]).is_err());
        }
        let other = [NamedPath::new("--output", &dir.join("new.safetensors"))];
        check_no_overwrite(&input, &other).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
