//! The `cloudbus` command-line tool. Today: `cloudbus schema check OLD NEW`, which
//! says whether the JSON Schema in file NEW is backward compatible with the one in
//! OLD (see `cloudbus::schema::check_compatibility`) and exits 1 when it is not, for
//! CI. Exit status 2: bad usage or unreadable input.

use std::process::ExitCode;

const USAGE: &str = "usage: cloudbus schema check OLD.json NEW.json";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["schema", "check", old, new] => schema_check(old, new),
        ["--help" | "-h" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn schema_check(old: &str, new: &str) -> ExitCode {
    let read = |path: &str| -> Result<serde_json::Value, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("{path} is not JSON: {e}"))
    };
    let (old_schema, new_schema) = match (read(old), read(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let verdict = cloudbus::schema::check_compatibility(&old_schema, &new_schema);
    if verdict.is_compatible() {
        println!("{new} is backward compatible with {old}");
        ExitCode::SUCCESS
    } else {
        print!("{new} is not backward compatible with {old}: {verdict}");
        ExitCode::from(1)
    }
}
