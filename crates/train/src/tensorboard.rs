//! A TensorBoard event-file writer for scalars: TFRecord framing (length, masked CRC32C) around
//! hand-encoded `Event { wall_time, step, summary { value { tag, simple_value } } }` protobufs,
//! in `events.out.tfevents.<time>.<host>` files that TensorBoard reads.
//!
//! The format, as TensorBoard's reader expects it:
//!
//! - a record is `u64 LE length`, `u32 LE masked_crc32c(length bytes)`, `data`,
//!   `u32 LE masked_crc32c(data)`, with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`;
//! - `data` is one `Event` protobuf: `wall_time = 1` (double), `step = 2` (int64),
//!   `file_version = 3` (string, `"brain.Event:2"` in the first event of a file), `summary = 5`;
//! - `Summary.value = 1` (repeated `Value`); `Value.tag = 1` (string), `Value.simple_value = 2`
//!   (float).
//!
//! [`read_scalars`] parses such a file back (used by the tests, and handy for checks).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

// ------------------------------------------------------------------------------ CRCs

/// Slice-by-8 tables of the reflected CRC-32 with polynomial `poly` (0xEDB88320 for the IEEE
/// CRC-32 of zlib/PNG, 0x82F63B78 for CRC-32C).
pub(crate) const fn crc_tables(poly: u32) -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut j = 1;
    while j < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        j += 1;
    }
    t
}

/// Runs the (pre- and post-inverted by the caller) reflected CRC state `crc` over `data`,
/// eight bytes at a time.
pub(crate) fn crc_update(t: &[[u32; 256]; 8], mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u32) & 0xff) as usize];
    }
    crc
}

/// CRC32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLES: [[u32; 256]; 8] = crc_tables(0x82F6_3B78);
    !crc_update(&TABLES, !0, data)
}

/// The masked CRC32C of TFRecord framing.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

// ------------------------------------------------------------------------------ protobuf

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from((field << 3) | wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The protobuf bytes of `Event { wall_time, step, file_version | summary { value { tag, simple_value } } }`.
fn encode_event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalar: Option<(&str, f32)>,
) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    put_key(&mut ev, 1, 1);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut ev, 2, 0);
    put_varint(&mut ev, step as u64);
    if let Some(v) = file_version {
        put_bytes(&mut ev, 3, v.as_bytes());
    }
    if let Some((tag, value)) = scalar {
        let mut val = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut val, 1, tag.as_bytes());
        put_key(&mut val, 2, 5);
        val.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::with_capacity(val.len() + 4);
        put_bytes(&mut summary, 1, &val);
        put_bytes(&mut ev, 5, &summary);
    }
    ev
}

/// `data` in TFRecord framing.
fn frame(data: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(data.len() + 16);
    let len = (data.len() as u64).to_le_bytes();
    rec.extend_from_slice(&len);
    rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    rec.extend_from_slice(data);
    rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    rec
}

// ------------------------------------------------------------------------------ writer

/// The host name for event-file names (letters, digits, `-`, `_` only).
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let clean: String =
        raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Seconds since the Unix epoch, as event `wall_time`s are.
pub fn now_wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Writes scalar summaries to one event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter").field("path", &self.path).finish()
    }
}

impl EventWriter {
    /// Creates `dir` and a new event file in it (starting with the `file_version` event).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        std::fs::create_dir_all(dir)?;
        let now = now_wall_time();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            now as u64,
            host_name(),
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        w.out.write_all(&frame(&encode_event(now, 0, Some("brain.Event:2"), None)))?;
        w.out.flush()?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one scalar.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: usize, wall_time: f64) -> std::io::Result<()> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        self.out.write_all(&frame(&encode_event(wall_time, step, None, Some((tag, value as f32)))))
    }

    /// Flushes to disk.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

// ------------------------------------------------------------------------------ reader

/// One event read back by [`read_events`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// The step.
    pub step: i64,
    /// `file_version`, in the first event of a file.
    pub file_version: Option<String>,
    /// The scalar summaries `(tag, simple_value)`.
    pub scalars: Vec<(String, f32)>,
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

fn get_varint(b: &[u8], i: &mut usize) -> std::io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).ok_or_else(|| bad("varint runs past the end"))?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("varint longer than 10 bytes"))
}

fn get_slice<'a>(b: &'a [u8], i: &mut usize, n: usize) -> std::io::Result<&'a [u8]> {
    let end = i.checked_add(n).filter(|&e| e <= b.len()).ok_or_else(|| bad("field runs past the end"))?;
    let s = &b[*i..end];
    *i = end;
    Ok(s)
}

/// Calls `f(field, wire, payload)` for each field of a protobuf message; varints come as
/// their 10-byte-or-less value in `payload` little-endian (8 bytes).
fn for_each_field(b: &[u8], mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut i = 0;
    while i < b.len() {
        let key = get_varint(b, &mut i)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = get_varint(b, &mut i)?;
                f(field, &v.to_le_bytes())?;
            }
            1 => f(field, get_slice(b, &mut i, 8)?)?,
            2 => {
                let n = get_varint(b, &mut i)? as usize;
                f(field, get_slice(b, &mut i, n)?)?;
            }
            5 => f(field, get_slice(b, &mut i, 4)?)?,
            w => return Err(bad(format!("unsupported wire type {w} (field {field})"))),
        }
    }
    Ok(())
}

fn le8(p: &[u8]) -> std::io::Result<[u8; 8]> {
    p.try_into().map_err(|_| bad("expected 8 bytes"))
}

fn decode_event(data: &[u8]) -> std::io::Result<Event> {
    let mut ev = Event { wall_time: 0.0, step: 0, file_version: None, scalars: Vec::new() };
    for_each_field(data, |field, p| {
        match field {
            1 => ev.wall_time = f64::from_le_bytes(le8(p)?),
            2 => ev.step = u64::from_le_bytes(le8(p)?) as i64,
            3 => ev.file_version = Some(String::from_utf8_lossy(p).into_owned()),
            5 => for_each_field(p, |field, value| {
                if field == 1 {
                    let (mut tag, mut v) = (String::new(), None);
                    for_each_field(value, |field, p| {
                        match field {
                            1 => tag = String::from_utf8_lossy(p).into_owned(),
                            2 => v = Some(f32::from_le_bytes(p.try_into().map_err(|_| bad("float"))?)),
                            _ => {}
                        }
                        Ok(())
                    })?;
                    if let Some(v) = v {
                        ev.scalars.push((tag, v));
                    }
                }
                Ok(())
            })?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(ev)
}

/// Parses an event file: every record's framing and both CRCs are checked; errors say which
/// record (by byte offset) is bad. A record cut off at the end (a writer still running, or a
/// crash mid-write) ends the list without an error, as TensorBoard treats it.
pub fn read_events(path: &Path) -> std::io::Result<Vec<Event>> {
    let b = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b.len() - i < 12 {
            break;
        }
        let len_bytes = &b[i..i + 8];
        let crc = u32::from_le_bytes([b[i + 8], b[i + 9], b[i + 10], b[i + 11]]);
        if crc != masked_crc32c(len_bytes) {
            return Err(bad(format!("record at byte {i}: length CRC mismatch")));
        }
        let n = u64::from_le_bytes(le8(len_bytes)?) as usize;
        let start = i + 12;
        let Some(end) = start.checked_add(n).and_then(|e| e.checked_add(4)).filter(|&e| e <= b.len()) else {
            break;
        };
        let data = &b[start..start + n];
        let crc = u32::from_le_bytes([b[end - 4], b[end - 3], b[end - 2], b[end - 1]]);
        if crc != masked_crc32c(data) {
            return Err(bad(format!("record at byte {i}: data CRC mismatch")));
        }
        out.push(decode_event(data).map_err(|e| bad(format!("record at byte {i}: {e}")))?);
        i = end;
    }
    Ok(out)
}

/// Every scalar of an event file as `(tag, step, value)`, in file order.
pub fn read_scalars(path: &Path) -> std::io::Result<Vec<(String, i64, f32)>> {
    Ok(read_events(path)?
        .into_iter()
        .flat_map(|e| e.scalars.into_iter().map(move |(t, v)| (t, e.step, v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 (iSCSI) test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
    }

    #[test]
    fn crc32c_matches_bitwise_for_every_length() {
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..data.len() {
            let mut c = !0u32;
            for &b in &data[..n] {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                }
            }
            assert_eq!(crc32c(&data[..n]), !c, "length {n}");
        }
    }

    #[test]
    fn varints() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut i = 0;
            assert_eq!(get_varint(&b, &mut i).unwrap(), v);
            assert_eq!(i, b.len());
        }
        let mut b = Vec::new();
        put_varint(&mut b, 300);
        assert_eq!(b, [0xAC, 0x02]);
    }

    #[test]
    fn event_bytes_by_hand() {
        // Event { wall_time: 1.5, step: 3, summary { value { tag: "a", simple_value: 2.0 } } }
        let ev = encode_event(1.5, 3, None, Some(("a", 2.0)));
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0x03, 0x2A, 0x0A, 0x0A, 0x08, 0x0A, 0x01, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(ev, want);
    }

    #[test]
    fn writes_a_file_that_reads_back() {
        let dir = std::env::temp_dir().join(format!("moeba-tb-test-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        w.add_scalar("train/loss", 2.5, 1, 100.0).unwrap();
        w.add_scalar("train/loss", 2.25, 2, 101.0).unwrap();
        w.add_scalar("val/loss", 1.0 / 3.0, 2, 101.5).unwrap();
        w.add_scalar("big/step", -4.0, 5_000_000_000, 102.0).unwrap();
        w.flush().unwrap();

        let raw = std::fs::read(w.path()).unwrap();
        // The first record: length, masked CRC of the length.
        let n = u64::from_le_bytes(raw[0..8].try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), masked_crc32c(&raw[0..8]));
        assert_eq!(
            u32::from_le_bytes(raw[12 + n..16 + n].try_into().unwrap()),
            masked_crc32c(&raw[12..12 + n])
        );

        let events = read_events(w.path()).unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events[0].scalars.is_empty());
        assert_eq!(events[1].wall_time, 100.0);
        assert_eq!(events[1].step, 1);
        assert_eq!(events[1].scalars, vec![("train/loss".to_string(), 2.5)]);
        assert_eq!(events[3].wall_time, 101.5);
        assert_eq!(events[3].scalars, vec![("val/loss".to_string(), (1.0f64 / 3.0) as f32)]);
        assert_eq!(events[4].step, 5_000_000_000);
        let s = read_scalars(w.path()).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[1], ("train/loss".to_string(), 2, 2.25));

        // A corrupted byte is detected; a cut-off last record is not an error.
        let path = w.path().to_path_buf();
        drop(w);
        let mut bad = raw.clone();
        let last = bad.len() - 6;
        bad[last] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let err = read_events(&path).unwrap_err();
        assert!(err.to_string().contains("data CRC mismatch"), "{err}");
        std::fs::write(&path, &raw[..raw.len() - 3]).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
