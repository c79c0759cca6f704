//! A minimal, strict zip reader over a byte slice: just what `torch.save` archives need (STORED
//! entries, data descriptors, zip64 end records and extra fields). It never copies entry data:
//! it returns ranges of the input.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use super::{first_overlap, Format};
use crate::error::{Error, Result};

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_EOCD_LEN: usize = 56;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const CENTRAL_LEN: usize = 46;
const LOCAL_SIG: u32 = 0x0403_4b50;
const LOCAL_LEN: usize = 30;
const MAX_COMMENT: usize = 0xFFFF;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at.checked_add(2)?)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// The archive's entries: name → byte range of the (stored, uncompressed) data in the input.
pub(crate) type Entries = BTreeMap<String, Range<usize>>;

/// Reads the central directory of the zip in `buf` and validates every entry.
pub(crate) fn read(path: &Path, buf: &[u8]) -> Result<Entries> {
    let bad = |reason: String| Error::Malformed {
        path: path.to_path_buf(),
        format: Format::Pth,
        reason,
    };
    let bad_entry = |entry: &str, reason: String| Error::ZipEntry {
        path: path.to_path_buf(),
        entry: entry.to_owned(),
        reason,
    };
    let truncated = || bad("truncated zip archive".into());

    // ---- end of central directory: the last EOCD signature whose comment fits the file
    if buf.len() < EOCD_LEN {
        return Err(bad(format!(
            "{} bytes is too short for a zip archive (truncated?)",
            buf.len()
        )));
    }
    let last = buf.len() - EOCD_LEN;
    let first = last.saturating_sub(MAX_COMMENT);
    let eocd = (first..=last)
        .rev()
        .find(|&at| {
            u32_at(buf, at) == Some(EOCD_SIG)
                && u16_at(buf, at + 20).is_some_and(|c| at + EOCD_LEN + c as usize <= buf.len())
        })
        .ok_or_else(|| {
            bad("no end-of-central-directory record (not a zip, or truncated)".into())
        })?;
    let field16 = |at| u16_at(buf, eocd + at).ok_or_else(truncated);
    let field32 = |at| u32_at(buf, eocd + at).ok_or_else(truncated);
    let (disk, cd_disk) = (field16(4)?, field16(6)?);
    let (mut n_disk, mut n_total) = (field16(8)? as u64, field16(10)? as u64);
    let (mut cd_size, mut cd_offset) = (field32(12)? as u64, field32(16)? as u64);
    let mut cd_limit = eocd; // the central directory must end before this

    // ---- zip64: the locator sits right before the EOCD record
    if eocd >= ZIP64_LOCATOR_LEN && u32_at(buf, eocd - ZIP64_LOCATOR_LEN) == Some(ZIP64_LOCATOR_SIG)
    {
        let loc = eocd - ZIP64_LOCATOR_LEN;
        let z_off = u64_at(buf, loc + 8).ok_or_else(truncated)?;
        let z = usize::try_from(z_off)
            .ok()
            .filter(|&z| z.checked_add(ZIP64_EOCD_LEN).is_some_and(|e| e <= loc))
            .ok_or_else(|| {
                bad(format!(
                    "zip64 end-of-central-directory offset {z_off} out of range"
                ))
            })?;
        if u32_at(buf, z) != Some(ZIP64_EOCD_SIG) {
            return Err(bad(format!(
                "no zip64 end-of-central-directory record at offset {z}"
            )));
        }
        let f32_ = |at| u32_at(buf, z + at).ok_or_else(truncated);
        let f64_ = |at| u64_at(buf, z + at).ok_or_else(truncated);
        if f32_(16)? != 0 || f32_(20)? != 0 {
            return Err(bad("multi-disk zip archives are not supported".into()));
        }
        n_disk = f64_(24)?;
        n_total = f64_(32)?;
        cd_size = f64_(40)?;
        cd_offset = f64_(48)?;
        cd_limit = z;
    } else if disk != 0 || cd_disk != 0 {
        return Err(bad("multi-disk zip archives are not supported".into()));
    }
    if n_disk != n_total {
        return Err(bad("multi-disk zip archives are not supported".into()));
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .filter(|&e| e <= cd_limit as u64)
        .ok_or_else(|| {
            bad(format!(
                "central directory [{cd_offset}, +{cd_size}) runs past its end record at {cd_limit}"
            ))
        })? as usize;
    let cd_start = cd_offset as usize;
    // Every central header takes at least 46 bytes: bounds the entry count before allocating.
    if n_total > (cd_size / CENTRAL_LEN as u64) {
        return Err(bad(format!(
            "{n_total} entries cannot fit a {cd_size}-byte central directory"
        )));
    }

    // ---- central directory
    let mut entries = Entries::new();
    let mut spans: Vec<(Range<usize>, usize)> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut at = cd_start;
    for _ in 0..n_total {
        let cd = buf.get(at..cd_end).ok_or_else(truncated)?;
        if cd.len() < CENTRAL_LEN || u32_at(cd, 0) != Some(CENTRAL_SIG) {
            return Err(bad(format!("bad central directory header at offset {at}")));
        }
        let g16 = |o| u16_at(cd, o).unwrap_or(0);
        let g32 = |o| u32_at(cd, o).unwrap_or(0);
        let flags = g16(8);
        let method = g16(10);
        let mut csize = g32(20) as u64;
        let mut usize_ = g32(24) as u64;
        let name_len = g16(28) as usize;
        let extra_len = g16(30) as usize;
        let comment_len = g16(32) as usize;
        let mut start_disk = g16(34) as u32;
        let mut local = g32(42) as u64;
        let total = CENTRAL_LEN + name_len + extra_len + comment_len;
        if cd.len() < total {
            return Err(bad(format!(
                "central directory header at offset {at} runs past the directory"
            )));
        }
        let raw_name = &cd[CENTRAL_LEN..CENTRAL_LEN + name_len];
        let lossy = String::from_utf8_lossy(raw_name).into_owned();
        let name = std::str::from_utf8(raw_name)
            .map_err(|_| bad_entry(&lossy, "the name is not UTF-8".into()))?
            .to_owned();
        // zip64 extended information: present fields are those saturated in the header
        let extra = &cd[CENTRAL_LEN + name_len..CENTRAL_LEN + name_len + extra_len];
        let mut e = 0usize;
        while e + 4 <= extra.len() {
            let id = u16_at(extra, e).unwrap_or(0);
            let len = u16_at(extra, e + 2).unwrap_or(0) as usize;
            let body = extra
                .get(e + 4..e + 4 + len)
                .ok_or_else(|| bad_entry(&name, "extra field runs past its header".into()))?;
            if id == 0x0001 {
                let mut p = 0usize;
                let mut take = |field: &mut u64, what: &str| -> Result<()> {
                    *field = u64_at(body, p).ok_or_else(|| {
                        bad_entry(&name, format!("zip64 extra field lacks the {what}"))
                    })?;
                    p += 8;
                    Ok(())
                };
                if usize_ == 0xFFFF_FFFF {
                    take(&mut usize_, "uncompressed size")?;
                }
                if csize == 0xFFFF_FFFF {
                    take(&mut csize, "compressed size")?;
                }
                if local == 0xFFFF_FFFF {
                    take(&mut local, "local header offset")?;
                }
                if start_disk == 0xFFFF {
                    start_disk = u32_at(body, p).ok_or_else(|| {
                        bad_entry(&name, "zip64 extra field lacks the disk number".into())
                    })?;
                }
            }
            e += 4 + len;
        }
        at += total;

        if method != 0 {
            return Err(bad_entry(
                &name,
                format!(
                    "compressed (method {method}); only STORED (uncompressed) entries are \
                     supported"
                ),
            ));
        }
        if flags & 1 != 0 {
            return Err(bad_entry(
                &name,
                "encrypted entries are not supported".into(),
            ));
        }
        if start_disk != 0 {
            return Err(bad_entry(&name, "entry on another disk".into()));
        }
        if csize != usize_ {
            return Err(bad_entry(
                &name,
                format!("stored entry with compressed size {csize} ≠ size {usize_}"),
            ));
        }
        check_name(&name).map_err(|r| bad_entry(&name, r))?;

        // local header: only its variable lengths matter (sizes may be in a data descriptor)
        let lh = usize::try_from(local)
            .ok()
            .filter(|&l| l < cd_start)
            .ok_or_else(|| {
                bad_entry(
                    &name,
                    format!("local header offset {local} is outside the entry area"),
                )
            })?;
        if u32_at(buf, lh) != Some(LOCAL_SIG) {
            return Err(bad_entry(&name, format!("no local header at offset {lh}")));
        }
        let l_name = u16_at(buf, lh + 26).ok_or_else(truncated)? as usize;
        let l_extra = u16_at(buf, lh + 28).ok_or_else(truncated)? as usize;
        let data_start = lh + LOCAL_LEN + l_name + l_extra;
        if buf.get(lh + LOCAL_LEN..lh + LOCAL_LEN + l_name) != Some(raw_name) {
            return Err(bad_entry(
                &name,
                "the local header's name differs from the central directory's".into(),
            ));
        }
        let data_end = (data_start as u64)
            .checked_add(csize)
            .filter(|&e| e <= cd_start as u64)
            .ok_or_else(|| {
                bad_entry(
                    &name,
                    format!(
                        "data [{data_start}, +{csize}) runs past the entry area (ends at \
                         {cd_start})"
                    ),
                )
            })? as usize;
        spans.push((lh..data_end, names.len()));
        names.push(name.clone());
        if entries.insert(name.clone(), data_start..data_end).is_some() {
            return Err(bad_entry(&name, "the name appears twice".into()));
        }
    }
    if let Some((a, b)) = first_overlap(&mut spans) {
        return Err(bad_entry(
            &names[b],
            format!("overlaps entry `{}`", names[a]),
        ));
    }
    Ok(entries)
}

/// Rejects names that could escape a directory if extracted, or are otherwise odd. The first
/// component may be `.` or `..`: `torch.save` names the archive's top folder after the file
/// name without its extension, so `..pth` and `...pth` hold `./data.pkl` and `../data.pkl`
/// (which `torch.load` reads; nibble extracts nothing).
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.starts_with('/') || name.starts_with('\\') {
        return Err("absolute path".into());
    }
    if name.contains('\0') || name.contains('\\') {
        return Err("NUL or backslash in the name".into());
    }
    if name.as_bytes().get(1) == Some(&b':') {
        return Err("drive letter in the name".into());
    }
    if name.split('/').skip(1).any(|c| c == ".." || c == ".") {
        return Err("path traversal (`.` or `..` component)".into());
    }
    Ok(())
}
