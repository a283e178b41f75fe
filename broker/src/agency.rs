//! Agency codes (mã định danh): parsing, levels, parents and routing keys.
//!
//! A code reads `V1V2V3.Z1Z2.Y1Y2.X1X2X3` and is read right to left: the rightmost part is the
//! province or ministry, then district (or department), commune (or office), and unit. A part of
//! zeros means "no lower level". Routing keys are the codes themselves, so a topic pattern such
//! as `*.*.31.H53` selects every unit of district 31 of province H53.

use std::fmt;
use std::str::FromStr;

/// A validated agency code such as `000.21.31.H53`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgencyCode(String);

/// How far down the administrative tree an agency sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgencyLevel {
    /// Level 1: a provincial People's Committee, a ministry (`000.00.00.H53`, `000.00.00.G22`).
    ProvinceOrMinistry,
    /// Level 2: a district People's Committee or a provincial department (`000.00.31.H53`).
    DistrictOrDepartment,
    /// Level 3: a commune or an office of a district (`000.21.31.H53`).
    CommuneOrOffice,
    /// Level 4: a unit under a level-3 agency (`001.01.07.H53`).
    Unit,
}

impl AgencyLevel {
    /// A short lowercase name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AgencyLevel::ProvinceOrMinistry => "province",
            AgencyLevel::DistrictOrDepartment => "district",
            AgencyLevel::CommuneOrOffice => "commune",
            AgencyLevel::Unit => "unit",
        }
    }
}

/// Why a string is not an agency code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{code}` is not an agency code (expected the form 000.00.00.H53): {reason}")]
pub struct AgencyCodeError {
    code: String,
    reason: &'static str,
}

impl AgencyCode {
    /// The code as written, which is also its routing key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The level-1 part: the province (`H53`) or ministry (`G22`) this agency belongs to.
    pub fn province(&self) -> &str {
        &self.0[10..13]
    }

    /// The agency's level, from its rightmost non-zero part.
    pub fn level(&self) -> AgencyLevel {
        let [unit, commune, district, _] = self.parts();
        if !is_zero(unit) {
            AgencyLevel::Unit
        } else if !is_zero(commune) {
            AgencyLevel::CommuneOrOffice
        } else if !is_zero(district) {
            AgencyLevel::DistrictOrDepartment
        } else {
            AgencyLevel::ProvinceOrMinistry
        }
    }

    /// The agency directly above this one: the code with its leftmost non-zero part zeroed.
    /// `None` for a province or ministry.
    pub fn parent(&self) -> Option<AgencyCode> {
        let [unit, commune, district, province] = self.parts();
        let parent = match self.level() {
            AgencyLevel::ProvinceOrMinistry => return None,
            AgencyLevel::DistrictOrDepartment => format!("000.00.00.{province}"),
            AgencyLevel::CommuneOrOffice => format!("000.00.{district}.{province}"),
            AgencyLevel::Unit => format!("000.{commune}.{district}.{province}"),
        };
        let _ = unit;
        Some(AgencyCode(parent))
    }

    /// The code of the province People's Committee (or ministry) at the top of this agency's tree.
    pub fn province_agency(&self) -> AgencyCode {
        AgencyCode(format!("000.00.00.{}", self.province()))
    }

    fn parts(&self) -> [&str; 4] {
        let s = self.0.as_str();
        [&s[0..3], &s[4..6], &s[7..9], &s[10..13]]
    }
}

fn is_zero(part: &str) -> bool {
    part.bytes().all(|b| b == b'0')
}

impl FromStr for AgencyCode {
    type Err = AgencyCodeError;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        let error = |reason| AgencyCodeError {
            code: code.chars().take(64).collect(),
            reason,
        };
        let bytes = code.as_bytes();
        if bytes.len() != 13 {
            return Err(error("it must be 13 characters long"));
        }
        if bytes[3] != b'.' || bytes[6] != b'.' || bytes[9] != b'.' {
            return Err(error("its four parts must be separated by dots"));
        }
        let digit_positions = [0, 1, 2, 4, 5, 7, 8, 11, 12];
        if !digit_positions.iter().all(|&i| bytes[i].is_ascii_digit()) {
            return Err(error(
                "all parts but the first letter of the last must be digits",
            ));
        }
        if !bytes[10].is_ascii_uppercase() {
            return Err(error("the last part must start with an uppercase letter"));
        }
        Ok(AgencyCode(code.to_owned()))
    }
}

impl TryFrom<&str> for AgencyCode {
    type Error = AgencyCodeError;
    fn try_from(code: &str) -> Result<Self, Self::Error> {
        code.parse()
    }
}

impl fmt::Display for AgencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgencyCode({})", self.0)
    }
}

/// Whether an AMQP topic pattern (`*` one word, `#` zero or more words) matches a routing key.
/// The embedded transport routes with it, so both transports share RabbitMQ's topic semantics.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| matches(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && matches(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && matches(rest, &key[1..]),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches(&pattern, &key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(s: &str) -> AgencyCode {
        s.parse().expect("valid code")
    }

    #[test]
    fn parses_the_examples_of_the_domain_notes() {
        for valid in [
            "000.00.00.H53",
            "000.00.13.H53",
            "000.05.31.H53",
            "001.01.07.H53",
            "000.00.00.G22",
        ] {
            assert_eq!(code(valid).as_str(), valid);
        }
    }

    #[test]
    fn refuses_malformed_codes_with_a_reason() {
        for invalid in [
            "",
            "000.00.00.h53",
            "000.00.00.H5",
            "000-00-00-H53",
            "00a.00.00.H53",
            "000.00.00.153",
            "000.00.00.H53 ",
        ] {
            let error = invalid.parse::<AgencyCode>().expect_err(invalid);
            assert!(
                error.to_string().contains("is not an agency code"),
                "{error}"
            );
        }
    }

    #[test]
    fn levels_parents_and_provinces_follow_from_the_code() {
        let commune = code("000.21.31.H53");
        assert_eq!(commune.level(), AgencyLevel::CommuneOrOffice);
        assert_eq!(commune.province(), "H53");
        let district = commune.parent().expect("a commune has a district");
        assert_eq!(district, code("000.00.31.H53"));
        assert_eq!(district.level(), AgencyLevel::DistrictOrDepartment);
        let province = district.parent().expect("a district has a province");
        assert_eq!(province, code("000.00.00.H53"));
        assert_eq!(province.parent(), None);
        assert_eq!(code("001.01.07.H53").parent(), Some(code("000.01.07.H53")));
        assert_eq!(commune.province_agency(), province);
    }

    #[test]
    fn topic_patterns_select_by_code_prefix() {
        assert!(topic_matches("000.21.31.H53", "000.21.31.H53"));
        assert!(topic_matches("*.*.31.H53", "000.21.31.H53"));
        assert!(!topic_matches("*.*.31.H53", "000.21.32.H53"));
        assert!(topic_matches("#.H53", "000.21.31.H53"));
        assert!(topic_matches("#", "000.21.31.H53"));
        assert!(!topic_matches("*.H53", "000.21.31.H53"));
        assert!(!topic_matches("000.21.31.H53", "000.21.31.H54"));
    }
}
