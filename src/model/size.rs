//! Byte sizes as operators write them, for `--max-body-size`, `--max-header-size` and
//! the `portcullis.io/max-body-size` annotation: one grammar for all of them.
//!
//! A size is a whole number, optionally followed by a unit, case-insensitively, with
//! optional spaces in between: none or `B` (bytes); `K`, `KB` (1000); `Ki`, `KiB`
//! (1024); `M`, `MB` (1000²); `Mi`, `MiB` (1024²); `G`, `GB` (1000³); `Gi`, `GiB`
//! (1024³). So `10MiB`, `512k`, `1gi` and `1048576` are sizes; `1.5M`, `-1` and `10 MiBs`
//! are not.

/// Parses a size (see the module docs). The error says what was wrong and gives
/// examples.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 1048576, 512k, 32KiB, 10MiB)"))?;
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "`{s}`: sizes are whole numbers (write 1536Ki rather than 1.5Mi)"
        ));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{}` (use B, K, KB, Ki, KiB, M, MB, Mi, MiB, G, GB, Gi, GiB)",
                unit.trim()
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units_in_any_case() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1048576", 1_048_576),
            ("100B", 100),
            ("100 b", 100),
            ("512k", 512_000),
            ("512K", 512_000),
            ("2 MB", 2_000_000),
            ("2mb", 2_000_000),
            ("32KiB", 32 * 1024),
            ("32kib", 32 * 1024),
            ("32Ki", 32 * 1024),
            ("10MiB", 10 << 20),
            ("10mi", 10 << 20),
            ("1G", 1_000_000_000),
            ("1GiB", 1 << 30),
            (" 7 Gi ", 7 << 30),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn fractions_are_refused_with_a_hint() {
        let err = parse_size("1.5M").expect_err("a fraction");
        assert!(err.contains("whole numbers"), "{err}");
    }

    #[test]
    fn non_sizes_are_refused() {
        for text in [
            "",
            "ten",
            "5XB",
            "1.5M",
            "-1",
            "10 MiBs",
            "MiB",
            "1 0",
            "0x10",
            "18446744073709551616",
            "20000000000GiB",
        ] {
            assert!(parse_size(text).is_err(), "{text:?} parsed");
        }
    }
}
