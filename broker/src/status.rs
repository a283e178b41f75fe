//! Status codes of the edXML feedback messages, and who may report each.

use std::fmt;
use std::str::FromStr;

/// A status code a party may report about a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    /// `01` received by the recipient's software, not yet registered by the clerk.
    Arrived,
    /// `02` refused.
    Refused,
    /// `03` accepted and registered.
    Accepted,
    /// `04` assigned to someone.
    Assigned,
    /// `05` in progress.
    InProgress,
    /// `06` completed.
    Completed,
    /// `13` the sender asks to recall the document.
    RecallRequested,
    /// `15` the recipient agrees to the recall or update.
    RecallAgreed,
    /// `16` the recipient refuses the recall or update.
    RecallRefused,
}

/// Who reports a status: the document's recipient (answers) or its sender (recall requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Recipient,
    Sender,
}

impl StatusCode {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusCode::Arrived => "01",
            StatusCode::Refused => "02",
            StatusCode::Accepted => "03",
            StatusCode::Assigned => "04",
            StatusCode::InProgress => "05",
            StatusCode::Completed => "06",
            StatusCode::RecallRequested => "13",
            StatusCode::RecallAgreed => "15",
            StatusCode::RecallRefused => "16",
        }
    }

    /// The party that may report this code.
    pub fn reporter(self) -> Reporter {
        match self {
            StatusCode::RecallRequested => Reporter::Sender,
            _ => Reporter::Recipient,
        }
    }
}

impl FromStr for StatusCode {
    type Err = String;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        Ok(match code {
            "01" => StatusCode::Arrived,
            "02" => StatusCode::Refused,
            "03" => StatusCode::Accepted,
            "04" => StatusCode::Assigned,
            "05" => StatusCode::InProgress,
            "06" => StatusCode::Completed,
            "13" => StatusCode::RecallRequested,
            "15" => StatusCode::RecallAgreed,
            "16" => StatusCode::RecallRefused,
            other => {
                return Err(format!(
                    "`{}` is not a status code (01-06 from the recipient, 13 from the sender, 15 or 16 from the recipient)",
                    other.chars().take(16).collect::<String>()
                ));
            }
        })
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_refused() {
        for code in ["01", "02", "03", "04", "05", "06", "13", "15", "16"] {
            assert_eq!(code.parse::<StatusCode>().expect(code).as_str(), code);
        }
        for bad in ["", "1", "07", "14", "99", "ok"] {
            assert!(bad.parse::<StatusCode>().is_err(), "{bad}");
        }
        assert_eq!(StatusCode::RecallRequested.reporter(), Reporter::Sender);
        assert_eq!(StatusCode::Completed.reporter(), Reporter::Recipient);
    }
}
