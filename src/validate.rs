//! Checksums that confirm a PII match: a card number's Luhn digit, an IBAN's mod-97, the shape
//! rules of a US SSN. A regex match that fails its validator is not a hit.

/// A check applied to the bytes of a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validator {
    Luhn,
    Iban,
    Ssn,
}

impl Validator {
    pub fn parse(s: &str) -> Option<Validator> {
        match s {
            "luhn" => Some(Validator::Luhn),
            "iban" => Some(Validator::Iban),
            "ssn" => Some(Validator::Ssn),
            _ => None,
        }
    }

    pub fn check(self, matched: &[u8]) -> bool {
        match self {
            Validator::Luhn => luhn(matched),
            Validator::Iban => iban(matched),
            Validator::Ssn => ssn(matched),
        }
    }
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
    fn ssn_shape() {
        assert!(ssn(b"123-45-6789"));
        assert!(!ssn(b"666-45-6789"));
        assert!(!ssn(b"123-00-6789"));
        assert!(!ssn(b"923-45-6789"));
    }
}
