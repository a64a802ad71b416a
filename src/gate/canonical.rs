//! The canonical request path (RFC 3986 §6.2.2): percent-encoded unreserved
//! characters decoded, other escapes in upper-case hex, dot segments removed
//! (§5.2.4), repeated slashes merged. Routes, `allow` and `skip_auth` see
//! only this path, and the upstream receives the same one, so an app never
//! serves something other than what the gate decided on.
//!
//! What cannot be made canonical without guessing is flagged for the route
//! to refuse (`%2F`, `%5C`, `\`, `;` parameters) or refused outright (NUL and
//! control characters, broken escapes, bytes outside ASCII).

use std::borrow::Cow;

/// A request target, made canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical<'a> {
    /// The path the gate decides on and the upstream receives.
    pub path: Cow<'a, str>,
    /// The query, as it came (never decoded: it is the app's to read).
    pub query: Option<&'a str>,
    /// The path has a `%2F` or `%5C` escape, or a raw `\`: a slash the
    /// upstream may or may not see as one.
    pub escaped_slash: bool,
    /// The path has `;` parameters (`/admin;jsessionid=…`, or an escaped
    /// `%3B`), which some servers strip before routing.
    pub parameters: bool,
    /// A Windows server (IIS) would read the path as another one: a segment
    /// ends in a dot or a space (`/admin./`, `/admin%20/`), which it strips,
    /// or an escape is not UTF-8 (overlong `%C0%AF`).
    pub windows_alias: bool,
}

/// Why a request target has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// NUL or another control character, raw or escaped.
    Control,
    /// A byte outside printable ASCII, or a `#`.
    Byte,
    /// Not an origin-form path (`/…`).
    NotAPath,
}

impl Malformed {
    pub fn reason(self) -> &'static str {
        match self {
            Malformed::BadEscape => "the path has a broken %-escape",
            Malformed::Control => "the path has a control character",
            Malformed::Byte => "the path has a character that is not allowed",
            Malformed::NotAPath => "the request target is not a path",
        }
    }
}

impl<'a> Canonical<'a> {
    /// Split `target` (`path?query`) and make its path canonical.
    pub fn of(target: &'a str) -> Result<Canonical<'a>, Malformed> {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        Canonical::path(path, query)
    }

    /// Make `path` canonical; `query` rides along untouched.
    pub fn path(path: &'a str, query: Option<&'a str>) -> Result<Canonical<'a>, Malformed> {
        // `*` (`OPTIONS *`) is about flowgate itself, no app's to answer.
        if !path.starts_with('/') {
            return Err(Malformed::NotAPath);
        }
        let mut clean = true;
        let mut escaped_slash = false;
        let mut parameters = false;
        let mut previous = 0u8;
        for &b in path.as_bytes() {
            match b {
                0..=0x1f | 0x7f => return Err(Malformed::Control),
                0x80.. | b'#' | b' ' => return Err(Malformed::Byte),
                b'%' => clean = false,
                b'\\' => {
                    escaped_slash = true;
                }
                b';' => parameters = true,
                b'/' if previous == b'/' => clean = false,
                b'.' if previous == b'/' => clean = false,
                _ => {}
            }
            previous = b;
        }
        if clean {
            return Ok(Canonical {
                path: Cow::Borrowed(path),
                query,
                escaped_slash,
                parameters,
                // No escapes, and a dot after a slash is not clean: only a
                // dot ending a named segment is left to look for.
                windows_alias: path.contains("./") || path.ends_with('.'),
            });
        }
        let decoded = decode_unreserved(path, &mut escaped_slash, &mut parameters)?;
        let path = remove_dot_segments(&decoded);
        Ok(Canonical {
            windows_alias: windows_alias(&path),
            path: Cow::Owned(path),
            query,
            escaped_slash,
            parameters,
        })
    }

    /// `path?query`, as the upstream receives it after its base path.
    pub fn target(&self) -> Cow<'_, str> {
        match self.query {
            None => Cow::Borrowed(&self.path),
            Some(query) => Cow::Owned(format!("{}?{query}", self.path)),
        }
    }

    /// The path with each segment's `;` parameters cut off: what servers
    /// that honour them (Tomcat, Jetty) route on.
    pub fn without_parameters(&self) -> Cow<'_, str> {
        if !self.parameters {
            return Cow::Borrowed(&self.path);
        }
        let mut out = String::with_capacity(self.path.len());
        for (i, segment) in self.path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            out.push_str(segment.split(';').next().unwrap_or(segment));
        }
        Cow::Owned(out)
    }
}

/// Decode escapes of unreserved characters; write the others in upper-case
/// hex. Escaped slashes and backslashes stay escaped (and are flagged), and
/// so does an escaped `;` (flagged as a parameter: some servers decode it
/// before they cut parameters off).
fn decode_unreserved(
    path: &str,
    escaped_slash: &mut bool,
    parameters: &mut bool,
) -> Result<String, Malformed> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b as char);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).and_then(|&h| hex(h)),
            bytes.get(i + 2).and_then(|&l| hex(l)),
        ) else {
            return Err(Malformed::BadEscape);
        };
        let value = hi << 4 | lo;
        match value {
            0..=0x1f | 0x7f => return Err(Malformed::Control),
            b'/' | b'\\' => {
                *escaped_slash = true;
                push_escape(&mut out, value);
            }
            b';' => {
                *parameters = true;
                push_escape(&mut out, value);
            }
            _ if unreserved(value) => out.push(value as char),
            _ => push_escape(&mut out, value),
        }
        i += 3;
    }
    Ok(out)
}

/// `Canonical::windows_alias` of a canonical path.
fn windows_alias(path: &str) -> bool {
    let odd_end = path
        .split('/')
        .any(|segment| segment.ends_with('.') || segment.ends_with("%20"));
    odd_end || {
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
        std::str::from_utf8(&bytes).is_err()
    }
}

fn push_escape(out: &mut String, value: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[(value >> 4) as usize] as char);
    out.push(HEX[(value & 15) as usize] as char);
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 §2.3.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// §5.2.4 over whole segments, with empty segments (`//`) merged away. A
/// segment is a dot segment by its name before any `;` (`..;x` is `..` to
/// the servers that read parameters). The trailing slash is kept, and one
/// is added where a dot segment ended the path (`/a/b/..` is `/a/`).
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = path.ends_with('/');
    for segment in path.split('/').skip(1) {
        let name = segment.split(';').next().unwrap_or(segment);
        match name {
            "" => {}
            "." => trailing = true,
            ".." => {
                kept.pop();
                trailing = true;
            }
            _ => {
                kept.push(segment);
                trailing = false;
            }
        }
    }
    if path.ends_with('/') {
        trailing = true;
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(target: &str) -> String {
        Canonical::of(target).unwrap().path.into_owned()
    }

    #[test]
    fn clean_paths_are_borrowed_as_they_are() {
        for clean in [
            "/",
            "/admin",
            "/admin/",
            "/a/b.css",
            "/a-b_c~d",
            "/x/.well-known",
        ] {
            let canonical = Canonical::of(clean).unwrap();
            // `/.well-known` has a dot after a slash: decoded, but unchanged.
            assert_eq!(canonical.path, clean);
        }
        assert!(matches!(
            Canonical::of("/app/x").unwrap().path,
            Cow::Borrowed(_)
        ));
        assert_eq!(Canonical::of("/a?b=%2F..").unwrap().query, Some("b=%2F.."));
    }

    #[test]
    fn every_spelling_of_a_path_has_one_canonical_form() {
        for spelled in [
            "/%61dmin/",
            "/%61%64%6D%69%6E/",
            "/%61%64%6d%69%6e/",
            "//admin/",
            "///admin//",
            "/./admin/",
            "/x/../admin/",
            "/x/y/../../admin/",
            "/%2e/admin/",
            "/x/%2e%2e/admin/",
            "/x/%2E%2E/admin/",
            "/x/.%2e/admin/",
            "/../admin/",
            "/admin/.",
            "/admin/x/..",
        ] {
            assert_eq!(path(spelled), "/admin/", "{spelled}");
        }
        assert_eq!(path("/admin/x/.."), "/admin/");
        assert_eq!(path("/a/b/../c"), "/a/c");
        assert_eq!(path("/.."), "/");
        assert_eq!(path("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(path("/100%25"), "/100%25");
    }

    #[test]
    fn slashes_in_disguise_and_parameters_are_flagged() {
        for disguised in [
            "/admin%2Findex.html",
            "/admin%2findex.html",
            "/admin%5Cx",
            "/admin\\x",
        ] {
            let canonical = Canonical::of(disguised).unwrap();
            assert!(canonical.escaped_slash, "{disguised}");
        }
        assert_eq!(path("/admin%2findex.html"), "/admin%2Findex.html");
        assert!(Canonical::of("/admin%3bx=1/page").unwrap().parameters);
        let parameters = Canonical::of("/admin;x=1/page").unwrap();
        assert!(parameters.parameters && !parameters.escaped_slash);
        assert_eq!(parameters.without_parameters(), "/admin/page");
        // `..;` is a dot segment to Tomcat: removed like `..`.
        assert_eq!(path("/public/..;/admin/"), "/admin/");
        assert_eq!(
            Canonical::of("/public/..;/admin/")
                .unwrap()
                .without_parameters(),
            "/admin/"
        );
    }

    #[test]
    fn what_has_no_canonical_form_is_refused() {
        for alias in [
            "/admin./",
            "/admin.",
            "/a/admin%20/x",
            "/a%2e/x",
            "/%C0%AFadmin",
            "/a/b%FF",
        ] {
            assert!(Canonical::of(alias).unwrap().windows_alias, "{alias}");
        }
        for plain in ["/admin/", "/a.b/c", "/caf%C3%A9", "/a%20b/"] {
            assert!(!Canonical::of(plain).unwrap().windows_alias, "{plain}");
        }
        for (target, why) in [
            ("/admin%00", Malformed::Control),
            ("/admin%0a", Malformed::Control),
            ("/admin%7F", Malformed::Control),
            ("/admin\0", Malformed::Control),
            ("/admin\t", Malformed::Control),
            ("/admin%", Malformed::BadEscape),
            ("/admin%4", Malformed::BadEscape),
            ("/admin%zz", Malformed::BadEscape),
            ("/caf\u{e9}", Malformed::Byte),
            ("/a#b", Malformed::Byte),
            ("admin", Malformed::NotAPath),
            ("*", Malformed::NotAPath),
            ("", Malformed::NotAPath),
        ] {
            assert_eq!(Canonical::of(target), Err(why), "{target:?}");
        }
    }

    /// Random targets: canonical or refused, never a panic; a canonical path
    /// is canonical again unchanged, starts with `/`, and holds no `//` and
    /// no dot segment.
    #[test]
    fn canonical_paths_are_fixed_points() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let alphabet: &[&str] = &[
            "/", "/", "a", "B", ".", "..", "%2e", "%2E", "%2f", "%5c", "%61", "%41", ";", "x=1",
            "%", "%0", "%00", "\\", "~", "%7e", "%C3%A9", "?", "-",
        ];
        for _ in 0..20000 {
            let mut target = String::from("/");
            for _ in 0..rng.gen_range(0..12) {
                target.push_str(alphabet[rng.gen_range(0..alphabet.len())]);
            }
            let Ok(canonical) = Canonical::of(&target) else {
                continue;
            };
            let path = canonical.path.clone().into_owned();
            assert!(path.starts_with('/'), "{target} -> {path}");
            assert!(!path.contains("//"), "{target} -> {path}");
            for segment in path.split('/') {
                let name = segment.split(';').next().unwrap();
                assert!(name != "." && name != "..", "{target} -> {path}");
            }
            let again = Canonical::of(&path).unwrap();
            assert_eq!(again.path, path, "{target}");
        }
    }
}
