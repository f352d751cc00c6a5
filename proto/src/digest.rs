//! Content addresses and chunk numbers.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest, written `sha256:<64 lowercase hex>` as in OCI.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The length of the raw digest in bytes.
    pub const LEN: usize = 32;
    const PREFIX: &'static str = "sha256:";
    /// 32 zero bytes: in a provisional manifest, a chunk whose digest is not known yet. No
    /// input is known to hash to it.
    pub const UNKNOWN: Digest = Digest([0; 32]);

    /// True for [`Digest::UNKNOWN`].
    pub fn is_unknown(&self) -> bool {
        *self == Self::UNKNOWN
    }

    /// A table of digests as the wire carries it: 32 raw bytes each, concatenated.
    pub fn table_bytes(digests: &[Digest]) -> Vec<u8> {
        let mut table = Vec::with_capacity(digests.len() * Self::LEN);
        for d in digests {
            table.extend_from_slice(d.as_bytes());
        }
        table
    }

    /// The digests of a wire table ([`Digest::table_bytes`]); `None` if its length is not a
    /// multiple of 32.
    pub fn from_table(table: &[u8]) -> Option<Vec<Digest>> {
        (table.len() % Self::LEN == 0).then(|| {
            (table.chunks_exact(Self::LEN))
                .map(|d| Digest(d.try_into().expect("32-byte chunks")))
                .collect()
        })
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Takes a raw 32-byte digest, as carried in protobuf `bytes` fields.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DigestParseError> {
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| DigestParseError::WrongRawLength(bytes.len()))?;
        Ok(Self(raw))
    }

    /// SHA-256 of `data`, in one call.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex characters without the `sha256:` prefix (file names, logs).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string or byte slice is not a digest. Each variant says exactly what is wrong so the
/// message can be shown to the person who typed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestParseError {
    #[error("digest is empty; expected sha256:<64 hex characters>")]
    Empty,
    #[error("digest {0:?} has no algorithm prefix; expected sha256:<64 hex characters>")]
    MissingAlgorithm(String),
    #[error("digest algorithm {0:?} is not supported; only sha256 is")]
    UnsupportedAlgorithm(String),
    #[error("sha256 digest has {0} hex characters; expected 64")]
    WrongHexLength(usize),
    #[error(
        "sha256 digest has invalid character {character:?} at position {position}; expected lowercase hex (0-9, a-f)"
    )]
    InvalidCharacter { character: char, position: usize },
    #[error("raw digest is {0} bytes; expected 32")]
    WrongRawLength(usize),
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(DigestParseError::Empty);
        }
        let Some((algorithm, hex_part)) = s.split_once(':') else {
            return Err(DigestParseError::MissingAlgorithm(truncate(s)));
        };
        if algorithm != "sha256" {
            return Err(DigestParseError::UnsupportedAlgorithm(truncate(algorithm)));
        }
        // OCI requires lowercase hex for sha256; reject uppercase so one blob has one name.
        if let Some((position, character)) = hex_part
            .char_indices()
            .find(|(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            return Err(DigestParseError::InvalidCharacter {
                character,
                position: Self::PREFIX.len() + position,
            });
        }
        if hex_part.len() != 64 {
            return Err(DigestParseError::WrongHexLength(hex_part.len()));
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut raw)
            .map_err(|_| DigestParseError::WrongHexLength(hex_part.len()))?;
        Ok(Self(raw))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A blob's identity: the digest of its whole content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct BlobId(pub Digest);

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for BlobId {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

impl From<Digest> for BlobId {
    fn from(d: Digest) -> Self {
        Self(d)
    }
}

/// The number of a chunk within its blob, from 0.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ChunkIndex(pub u32);

impl ChunkIndex {
    pub const fn get(self) -> u32 {
        self.0
    }
    pub const fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn round_trips_display_and_parse() {
        let d = Digest::of(b"");
        assert_eq!(d.to_string(), EMPTY_SHA);
        assert_eq!(EMPTY_SHA.parse::<Digest>(), Ok(d));
        assert_eq!(Digest::from_slice(d.as_bytes()), Ok(d));
    }

    #[test]
    fn rejects_each_malformed_input_precisely() {
        let cases: &[(&str, DigestParseError)] = &[
            ("", DigestParseError::Empty),
            ("e3b0", DigestParseError::MissingAlgorithm("e3b0".into())),
            (
                "md5:abcd",
                DigestParseError::UnsupportedAlgorithm("md5".into()),
            ),
            ("sha256:abcd", DigestParseError::WrongHexLength(4)),
            (&EMPTY_SHA[..70], DigestParseError::WrongHexLength(63)),
            (
                "sha256:E3b0",
                DigestParseError::InvalidCharacter {
                    character: 'E',
                    position: 7,
                },
            ),
            (
                "sha256:e3b0 ",
                DigestParseError::InvalidCharacter {
                    character: ' ',
                    position: 11,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<Digest>().as_ref(),
                Err(want),
                "input {input:?}"
            );
            // Every error renders to a one-line message.
            assert!(!want.to_string().contains('\n'));
        }
        let too_long = format!("{EMPTY_SHA}00");
        assert_eq!(
            too_long.parse::<Digest>(),
            Err(DigestParseError::WrongHexLength(66))
        );
        assert_eq!(
            Digest::from_slice(&[0; 31]),
            Err(DigestParseError::WrongRawLength(31))
        );
    }
}
