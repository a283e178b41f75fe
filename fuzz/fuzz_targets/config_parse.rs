//! Fuzzes the configuration parser: any text gets a configuration or a one-line error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(message) = lienthong::config::Config::parse_and_validate(text) {
            assert!(!message.contains('\n'), "errors are one line: {message}");
        }
    }
});
