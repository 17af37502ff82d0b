//! What valid JSON a worker still cannot read as it was meant. The worker decodes with
//! orjson, which refuses a number beyond the range of a double and a string with a lone
//! surrogate escape (`"\ud800"`): a call frame it cannot decode is a broken protocol and
//! ends the worker. It reads an integer beyond 64 bits as a float, silently. The host
//! refuses arguments holding any of these, as a malformed request, before any worker
//! sees them.

/// The longest piece of a refused number shown in the refusal.
const SHOWN: usize = 40;

/// Why a worker could not read the JSON text `json` (valid JSON) as it was meant, if it
/// could not.
pub(crate) fn unreadable(json: &str) -> Option<String> {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => match string_end(bytes, i + 1) {
                Ok(end) => i = end,
                Err(at) => {
                    let escape = json.get(at..at + 6).unwrap_or_default();
                    return Some(format!(
                        "a string holds a lone surrogate escape ({escape}), which is not text"
                    ));
                }
            },
            b'-' | b'0'..=b'9' => {
                let len = bytes[i..]
                    .iter()
                    .position(|b| !matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .unwrap_or(bytes.len() - i);
                if let Some(why) = unreadable_number(&json[i..i + len]) {
                    return Some(why);
                }
                i += len;
            }
            _ => i += 1,
        }
    }
    None
}

fn unreadable_number(number: &str) -> Option<String> {
    let shown = || match number.get(..SHOWN) {
        Some(start) if number.len() > SHOWN => format!("{start}…"),
        _ => number.to_owned(),
    };
    if number.contains(['.', 'e', 'E']) {
        // A valid JSON number always parses: one too large for a double is infinite.
        let finite = number.parse::<f64>().is_ok_and(f64::is_finite);
        (!finite).then(|| format!("a number is beyond the range of a double ({})", shown()))
    } else {
        let fits = number.parse::<i64>().is_ok() || number.parse::<u64>().is_ok();
        (!fits).then(|| {
            format!(
                "an integer is beyond 64 bits ({}): it would be read as a float; send it as a string",
                shown()
            )
        })
    }
}

/// Where the string whose text starts at `i` ends (just past its closing quote), or
/// `Err` with where its first lone surrogate escape is.
fn string_end(bytes: &[u8], mut i: usize) -> Result<usize, usize> {
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Ok(i + 1),
            b'\\' if bytes.get(i + 1) == Some(&b'u') => match unit(bytes, i) {
                Some(0xD800..=0xDBFF) if matches!(unit(bytes, i + 6), Some(0xDC00..=0xDFFF)) => {
                    i += 12;
                }
                Some(0xD800..=0xDFFF) => return Err(i),
                _ => i += 6,
            },
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// The UTF-16 unit of the `\uXXXX` escape at `at`, if there is one.
fn unit(bytes: &[u8], at: usize) -> Option<u32> {
    if bytes.get(at..at + 2)? != b"\\u" {
        return None;
    }
    let hex = std::str::from_utf8(bytes.get(at + 2..at + 6)?).ok()?;
    u32::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_orjson_reads_exactly_passes() {
        for json in [
            r#"{"a":[1,-2,3.5,-0.0,1e300,-1.5E-300,1e-400,true,false,null]}"#,
            "18446744073709551615",
            "-9223372036854775808",
            r#""\ud83d\ude00 and \u00e9, \" \\ud800 \n""#,
            r#"{"1e400":"123456789012345678901234567890"}"#,
        ] {
            assert_eq!(unreadable(json), None, "{json}");
        }
    }

    #[test]
    fn integers_beyond_64_bits_are_refused() {
        for json in [
            "18446744073709551616",
            "[-9223372036854775809]",
            r#"{"n":123456789012345678901234567890123456789012345678901234567890}"#,
        ] {
            let why = unreadable(json).unwrap();
            assert!(why.contains("beyond 64 bits"), "{json}: {why}");
        }
        let why = unreadable(&"9".repeat(500)).unwrap();
        assert!(why.contains(&format!("({}…)", "9".repeat(SHOWN))), "{why}");
    }

    #[test]
    fn numbers_beyond_a_double_are_refused() {
        for json in ["[1e400]", r#"{"x":-1.5e309}"#, "1E+999"] {
            let why = unreadable(json).unwrap();
            assert!(why.contains("range of a double"), "{json}: {why}");
        }
    }

    #[test]
    fn lone_surrogate_escapes_are_refused() {
        for (json, escape) in [
            (r#""\ud800""#, r"\ud800"),
            (r#"["ok","a\uDBFFb"]"#, r"\uDBFF"),
            (r#"{"k":"\udc00"}"#, r"\udc00"),
            (r#""\ud800\u0041""#, r"\ud800"),
            (r#"{"\ude00":1}"#, r"\ude00"),
        ] {
            let why = unreadable(json).unwrap();
            assert!(why.contains(escape), "{json}: {why}");
        }
    }

    #[test]
    fn json_written_from_a_value_is_always_readable() {
        // What `Readable::Known` rests on: a Value holds no integer beyond 64 bits (a
        // larger one is read as a float, unless serde_json's arbitrary_precision is on)
        // and no lone surrogate, and a non-finite float is written as null.
        let big: serde_json::Value =
            serde_json::from_str("[123456789012345678901234567890, 1e300]").unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(r#""\ud800""#).is_err());
        let values = [
            big,
            serde_json::json!([f64::NAN, f64::INFINITY, u64::MAX, i64::MIN, "\u{1F40D}"]),
        ];
        for value in values {
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(unreadable(&json), None, "{json}");
        }
    }
}
