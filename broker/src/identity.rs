//! Who is calling: an agency code, and the roles its certificate grants (`urn:lienthong:role:…`).
//! Without TLS a caller has no roles; operators and auditors are then the `[access]` lists.

use crate::agency::AgencyCode;

/// A role a certificate grants besides the agency identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May use `service Admin`.
    Operator,
    /// May read the whole ledger (`service Audit`).
    Auditor,
    /// A federation peer (another hub).
    Hub,
}

/// The URI prefix of a role in a certificate's subject alternative names.
pub const ROLE_URI_PREFIX: &str = "urn:lienthong:role:";

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "operator" => Ok(Role::Operator),
            "auditor" => Ok(Role::Auditor),
            "hub" => Ok(Role::Hub),
            other => Err(format!("`{other}` is not a role (operator, auditor, hub)")),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub agency: AgencyCode,
    pub roles: Vec<Role>,
}

impl Caller {
    /// A caller with no roles beyond its agency.
    pub fn agency(agency: AgencyCode) -> Caller {
        Caller {
            agency,
            roles: Vec::new(),
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.agency.fmt(f)
    }
}
