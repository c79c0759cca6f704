//! `peft::save_adapter` writes each file to a temporary one and renames it into place: it must
//! refuse an adapter file that exists as anything but a regular file (a symbolic link, a FIFO,
//! a directory) rather than silently replace it, and write nothing at all then.
#![cfg(unix)]

use nibble_io::Checkpoint;
use nibble_nn::peft::{CONFIG_FILE, WEIGHTS_FILE};
use nibble_nn::{peft, Activation, Sequential, SequentialOptions};
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-nn-no-replace-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model_with_lora() -> Sequential {
    let options = SequentialOptions::new()
        .activation_at(1, Activation::Gelu)
        .activation_at(4, Activation::Relu);
    let mut model =
        Sequential::from_state_dict(&Checkpoint::open(data("seq_d30.pth")).unwrap(), &options)
            .unwrap();
    model.add_lora(4, 7).unwrap();
    model
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_symlinked_weights_file_is_refused_and_nothing_is_written() {
    let dir = tempdir("weights-link");
    let adapter = dir.join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let target = dir.join("precious.bin");
    std::fs::write(&target, b"precious").unwrap();
    let link = adapter.join(WEIGHTS_FILE);
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let e = peft::save_adapter(model_with_lora().linears(), &adapter)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&link.display().to_string()), "no path: {e}");
    assert!(
        e.contains("symbolic link") && e.contains("refusing to replace it"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), target);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    // Nothing else was written: no config, no temporary file.
    assert_eq!(names(&adapter), [WEIGHTS_FILE]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_symlinked_config_file_is_refused_before_the_weights_are_written() {
    let dir = tempdir("config-link");
    let target = dir.join("precious.json");
    std::fs::write(&target, b"{}").unwrap();
    let adapter = dir.join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let link = adapter.join(CONFIG_FILE);
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let e = peft::save_adapter(model_with_lora().linears(), &adapter)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&link.display().to_string()) && e.contains("symbolic link"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"{}");
    assert_eq!(names(&adapter), [CONFIG_FILE]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fifo_weights_file_is_refused() {
    use std::os::unix::fs::FileTypeExt;
    let adapter = tempdir("fifo");
    let fifo = adapter.join(WEIGHTS_FILE);
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(s) if s.success() => {}
        other => {
            println!("skipping the FIFO test: mkfifo unavailable ({other:?})");
            std::fs::remove_dir_all(&adapter).unwrap();
            return;
        }
    }
    let e = peft::save_adapter(model_with_lora().linears(), &adapter)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&fifo.display().to_string()) && e.contains("FIFO"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(names(&adapter), [WEIGHTS_FILE]);
    std::fs::remove_dir_all(&adapter).unwrap();
}

#[test]
fn regular_files_are_still_replaced_and_the_adapter_round_trips() {
    let adapter = tempdir("regular");
    std::fs::write(adapter.join(WEIGHTS_FILE), b"old").unwrap();
    std::fs::write(adapter.join(CONFIG_FILE), b"old").unwrap();
    // A link under a temporary-looking name is never opened: each file is written into a new
    // temporary file (`create_new`), so the link and its target stay as they were.
    let elsewhere = adapter.join("elsewhere.txt");
    std::fs::write(&elsewhere, b"keep").unwrap();
    std::os::unix::fs::symlink(&elsewhere, adapter.join(format!(".{CONFIG_FILE}.tmp"))).unwrap();

    let model = model_with_lora();
    peft::save_adapter(model.linears(), &adapter).unwrap();
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
    assert_eq!(
        names(&adapter),
        [
            format!(".{CONFIG_FILE}.tmp").as_str(),
            CONFIG_FILE,
            WEIGHTS_FILE,
            "elsewhere.txt"
        ]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["r"], 4);
    let weights = Checkpoint::open(adapter.join(WEIGHTS_FILE)).unwrap();
    let first = model.linears().next().unwrap();
    let a = weights
        .tensor_f32(
            &format!("base_model.model.{}.lora_A.weight", first.name),
            None,
        )
        .unwrap();
    assert_eq!(a.data(), first.lora.as_ref().unwrap().a.value().data());
    std::fs::remove_dir_all(&adapter).unwrap();
}
