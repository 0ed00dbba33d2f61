//! Which path a request names: the one normalised form that routing, every policy and
//! the upstream see (INTERFACE.md, "Which path a request names").
//!
//! [`normalize`] does what Envoy's `normalize_path` + `merge_slashes` do, and what nginx
//! does before it matches locations:
//! - percent-encoded unreserved characters (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`) are
//!   decoded; every other percent-encoding is kept, with its hex digits in upper case;
//! - repeated slashes are merged;
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4); a `.` or `..` as the last
//!   segment leaves a trailing slash, as that section says.
//!
//! Refused (the request is answered 400, [`PathError`]): a path that climbs above `/`,
//! an encoded `/` or `\` (`%2F`, `%5C`: a backend that decodes them would see other
//! segments than the ones routed on), an encoded NUL, a `%` not followed by two hex
//! digits, a raw `\` (not a URI character, and a path separator to some backends), and a
//! `.` or `..` segment with `;` parameters (`/public/..;/admin`: Tomcat and Jetty drop
//! the parameters and climb, after routing saw `/public`).
//! So normalising a normalised path changes nothing, and no decoding step can make a new
//! escape out of what it decoded.
//!
//! A path that needs none of this is returned borrowed: the common case costs one scan
//! and no allocation. The query is not part of the input and never changes.

use std::borrow::Cow;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `..` segment would climb above the root.
    #[error("path climbs above /")]
    AboveRoot,
    /// `%2F` or `%5C`, in either case.
    #[error("encoded slash or backslash in path")]
    EncodedSlash,
    /// `%00`.
    #[error("encoded NUL in path")]
    Nul,
    /// A `%` not followed by two hex digits: invalid URI syntax (RFC 3986 §2.1), and
    /// kept as it is it could pair with a decoded character into a new escape.
    #[error("invalid percent-encoding in path")]
    BadEscape,
    /// A raw `\`.
    #[error("backslash in path")]
    Backslash,
    /// A `.` or `..` segment with parameters (`..;x`): servlet containers drop the
    /// parameters and act on the dot segment, which routing would not have seen.
    #[error("dot segment with parameters in path")]
    DotSegmentParams,
}

/// The normalised form of `path` (the path of a request target, without its query).
/// Paths that do not start with `/` (such as `*` of `OPTIONS *`) are returned unchanged.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || is_normal(path.as_bytes())? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path.as_bytes())?;
    let normalised = remove_dot_segments(&decoded)?;
    // The input was UTF-8, and only ASCII bytes were decoded, removed or inserted, so
    // every multi-byte sequence is kept whole: the conversion cannot fail.
    Ok(Cow::Owned(String::from_utf8(normalised).unwrap_or_else(
        |e| String::from_utf8_lossy(e.as_bytes()).into_owned(),
    )))
}

/// Whether `path` is already normal: no percent sign, no empty segment after the first
/// byte, no `.` or `..` segment. A raw backslash is refused here already.
#[inline]
fn is_normal(b: &[u8]) -> Result<bool, PathError> {
    let mut normal = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' | b';' => normal = false,
            b'\\' => return Err(PathError::Backslash),
            b'/' if is_dot_segment(b, i + 1) || b.get(i + 1) == Some(&b'/') => normal = false,
            _ => {}
        }
    }
    Ok(normal)
}

/// Whether the segment starting at `start` (up to the next `/` or the end) is `.` or
/// `..`.
fn is_dot_segment(b: &[u8], start: usize) -> bool {
    let end = b[start.min(b.len())..]
        .iter()
        .position(|&c| c == b'/')
        .map_or(b.len(), |p| start + p);
    matches!(&b[start.min(b.len())..end], b"." | b"..")
}

/// Percent-decoding of unreserved characters; other escapes are kept with upper case
/// hex digits, and a `%` not followed by two hex digits is refused.
fn decode(b: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            return Err(PathError::Backslash);
        }
        if c == b'%' {
            let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = hi << 4 | lo;
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSlash),
                0 => return Err(PathError::Nul),
                _ if is_unreserved(v) => out.push(v),
                _ => {
                    out.push(b'%');
                    out.push(b[i + 1].to_ascii_uppercase());
                    out.push(b[i + 2].to_ascii_uppercase());
                }
            }
            i += 3;
            continue;
        }
        out.push(c);
        i += 1;
    }
    Ok(out)
}

/// The value of one hexadecimal digit.
pub(crate) fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Merges slashes and removes dot segments of a path that starts with `/`.
fn remove_dot_segments(path: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    // The first element is the empty string before the leading slash.
    for segment in path.split(|&c| c == b'/').skip(1) {
        trailing = true;
        if let Some(at) = segment.iter().position(|&c| c == b';')
            && matches!(&segment[..at], b"." | b"..")
        {
            return Err(PathError::DotSegmentParams);
        }
        match segment {
            b"" | b"." => {}
            b".." => {
                kept.pop().ok_or(PathError::AboveRoot)?;
            }
            s => {
                kept.push(s);
                trailing = false;
            }
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for s in &kept {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing || kept.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("/", "/"),
            ("/foo", "/foo"),
            ("/foo/", "/foo/"),
            ("/foo/bar", "/foo/bar"),
            ("/.well-known/acme", "/.well-known/acme"),
            ("/a.b/c..d/...", "/a.b/c..d/..."),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a//", "/a/"),
            ("//", "/"),
            ("/public/../admin", "/admin"),
            ("/public/./admin", "/public/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/%61dmin", "/admin"),
            ("/%7euser/%2D%2e%5F", "/~user/-._"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/%252F", "/%252F"),
            ("/a;b/c;d=1", "/a;b/c;d=1"),
            ("/...;x", "/...;x"),
            ("*", "*"),
        ];
        for (input, want) in ok {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
        let refused = [
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/%2e%2e/etc/passwd", PathError::AboveRoot),
            ("//../a", PathError::AboveRoot),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedSlash),
            ("/a%00b", PathError::Nul),
            ("/100%", PathError::BadEscape),
            ("/%zz", PathError::BadEscape),
            ("/%4", PathError::BadEscape),
            ("/%%34%31", PathError::BadEscape),
            ("/a\\b", PathError::Backslash),
            ("/public/..;/admin", PathError::DotSegmentParams),
            ("/public/.;x/admin", PathError::DotSegmentParams),
            ("/public/%2e%2e;/admin", PathError::DotSegmentParams),
            ("/a\\..\\b", PathError::Backslash),
        ];
        for (input, want) in refused {
            assert_eq!(normalize(input), Err(want), "{input}");
        }
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        for p in ["/", "/foo/bar", "/foo/", "/.well-known/x", "/a-b_c~d"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }
}
