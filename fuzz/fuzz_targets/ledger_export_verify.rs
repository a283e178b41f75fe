//! Fuzzes the offline verifier of exported ledgers, which auditors run on files they did not
//! write: any text is verified or refused with a position, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lienthong::ledger::export::verify(text, &[7; 32]);
    }
});
