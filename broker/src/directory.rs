//! The agency directory: which agencies exist and may send or receive through this hub.

use crate::agency::AgencyCode;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One agency of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agency {
    pub code: AgencyCode,
    pub name: String,
}

/// Every agency the hub knows, by code.
#[derive(Debug, Clone, Default)]
pub struct AgencyDirectory {
    agencies: BTreeMap<AgencyCode, Agency>,
}

/// Why a directory file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("cannot read the agency directory {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("agency directory {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryToml {
    #[serde(default)]
    agency: Vec<AgencyToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgencyToml {
    code: String,
    name: String,
}

impl AgencyDirectory {
    /// Reads and validates a directory file (`[[agency]] code = ".." name = ".."`).
    pub fn load(path: &Path) -> Result<Self, DirectoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DirectoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| DirectoryError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses directory TOML; the error is one line naming the offending entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parsed: DirectoryToml =
            toml::from_str(text).map_err(|e| crate::config::one_line_toml_error(text, &e))?;
        let mut agencies = BTreeMap::new();
        for (index, entry) in parsed.agency.into_iter().enumerate() {
            let code: AgencyCode = entry
                .code
                .parse()
                .map_err(|e| format!("agency #{}: {e}", index + 1))?;
            if entry.name.trim().is_empty() {
                return Err(format!("agency #{} ({code}): `name` is empty", index + 1));
            }
            let agency = Agency {
                code: code.clone(),
                name: entry.name,
            };
            if agencies.insert(code.clone(), agency).is_some() {
                return Err(format!(
                    "agency #{}: code {code} is listed twice",
                    index + 1
                ));
            }
        }
        Ok(AgencyDirectory { agencies })
    }

    /// Builds a directory from agencies already validated, for tests and tools.
    pub fn from_agencies(agencies: impl IntoIterator<Item = Agency>) -> Self {
        AgencyDirectory {
            agencies: agencies.into_iter().map(|a| (a.code.clone(), a)).collect(),
        }
    }

    pub fn get(&self, code: &AgencyCode) -> Option<&Agency> {
        self.agencies.get(code)
    }

    pub fn contains(&self, code: &AgencyCode) -> bool {
        self.agencies.contains_key(code)
    }

    pub fn codes(&self) -> impl Iterator<Item = &AgencyCode> {
        self.agencies.keys()
    }

    pub fn len(&self) -> usize {
        self.agencies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agencies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agencies_and_refuses_duplicates_and_bad_codes() {
        let directory = AgencyDirectory::parse(
            "[[agency]]\ncode = \"000.00.00.H53\"\nname = \"UBND tỉnh\"\n[[agency]]\ncode = \"000.21.31.H53\"\nname = \"UBND xã\"\n",
        )
        .expect("valid directory");
        assert_eq!(directory.len(), 2);
        assert!(directory.contains(&"000.21.31.H53".parse().expect("code")));

        let duplicate = AgencyDirectory::parse(
            "[[agency]]\ncode = \"000.00.00.H53\"\nname = \"a\"\n[[agency]]\ncode = \"000.00.00.H53\"\nname = \"b\"\n",
        )
        .expect_err("duplicate");
        assert!(duplicate.contains("listed twice"), "{duplicate}");

        let bad = AgencyDirectory::parse("[[agency]]\ncode = \"H53\"\nname = \"a\"\n")
            .expect_err("bad code");
        assert!(bad.contains("agency #1") && bad.contains("`H53`"), "{bad}");

        let unknown = AgencyDirectory::parse(
            "[[agency]]\ncode = \"000.00.00.H53\"\nname = \"a\"\nparent = \"x\"\n",
        )
        .expect_err("unknown key");
        assert!(unknown.contains("parent"), "{unknown}");
    }
}
