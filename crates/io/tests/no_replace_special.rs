//! `write_safetensors` writes to a temporary file and renames it over the target: it must
//! refuse (naming the path and what it is) a target that exists as anything but a regular file
//! — a symbolic link, a FIFO, a directory, a device — rather than silently replace it.
#![cfg(unix)]

use nibble_io::{write_safetensors, DType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-io-no-replace-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path) -> nibble_io::Result<()> {
    let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(
        path,
        &[("w".to_owned(), DType::F32, vec![2], &bytes[..])],
        &BTreeMap::new(),
    )
}

/// No temporary file is left beside the target.
fn no_leftovers(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn a_symlink_to_a_regular_file_is_refused_and_left_alone() {
    let dir = tmpdir("symlink");
    let target = dir.join("target.bin");
    std::fs::write(&target, b"precious").unwrap();
    let link = dir.join("out.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let e = write(&link).unwrap_err().to_string();
    assert!(e.contains(&link.display().to_string()), "no path: {e}");
    assert!(e.contains("symbolic link"), "no kind: {e}");
    assert!(e.contains("refusing to replace it"), "{e}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    no_leftovers(&dir, &["target.bin", "out.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dangling_symlink_is_refused_and_left_alone() {
    let dir = tmpdir("dangling");
    let link = dir.join("out.safetensors");
    std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
    let e = write(&link).unwrap_err().to_string();
    assert!(
        e.contains(&link.display().to_string()) && e.contains("symbolic link"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!dir.join("nowhere").exists());
    no_leftovers(&dir, &["out.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fifo_is_refused_and_left_alone() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tmpdir("fifo");
    let fifo = dir.join("out.safetensors");
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(s) if s.success() => {}
        other => {
            println!("skipping the FIFO test: mkfifo unavailable ({other:?})");
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
    }
    let e = write(&fifo).unwrap_err().to_string();
    assert!(
        e.contains(&fifo.display().to_string()) && e.contains("FIFO"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    no_leftovers(&dir, &["out.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_directory_is_refused_and_left_alone() {
    let dir = tmpdir("dir");
    let sub = dir.join("out.safetensors");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("inside"), b"x").unwrap();
    let e = write(&sub).unwrap_err().to_string();
    assert!(
        e.contains(&sub.display().to_string()) && e.contains("a directory"),
        "{e}"
    );
    assert_eq!(std::fs::read(sub.join("inside")).unwrap(), b"x");
    no_leftovers(&dir, &["out.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

// No test writes to `/dev/null` itself: should the check ever regress, running as root would
// replace the machine's `/dev/null` with a regular file. The FIFO stands for special files.

#[test]
fn a_missing_path_or_a_regular_file_is_still_written() {
    let dir = tmpdir("regular");
    let out = dir.join("out.safetensors");
    write(&out).unwrap();
    let first = std::fs::read(&out).unwrap();
    std::fs::write(&out, b"old content").unwrap();
    write(&out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), first);
    assert!(std::fs::symlink_metadata(&out)
        .unwrap()
        .file_type()
        .is_file());
    no_leftovers(&dir, &["out.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A regular file replaced keeps its permissions, and a name near the file system's 255-byte
/// limit still gets its temporary file beside it.
#[test]
fn a_replaced_file_keeps_its_mode_and_long_names_are_written() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir("mode");
    let private = dir.join("private.safetensors");
    std::fs::write(&private, b"old").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    write(&private).unwrap();
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let long = format!("{}.safetensors", "n".repeat(240));
    write(&dir.join(&long)).unwrap();
    no_leftovers(&dir, &["private.safetensors", &long]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A path ending in `/` names a directory, not a file to write: refused before anything is
/// created (it failed at the rename, after writing the temporary file).
#[test]
fn a_path_ending_in_a_slash_is_refused() {
    let dir = tmpdir("slash");
    let out = PathBuf::from(format!("{}/out/", dir.display()));
    let e = write(&out).unwrap_err().to_string();
    assert!(e.contains("ends with `/`"), "{e}");
    no_leftovers(&dir, &[]);
    std::fs::remove_dir_all(&dir).unwrap();
}
