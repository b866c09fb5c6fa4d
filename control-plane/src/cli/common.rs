//! What several commands share: the imports every command file starts from, and small
//! helpers (key=value pairs, confirmation, durations, JSON output).

pub(crate) use std::io::IsTerminal;
pub(crate) use std::path::PathBuf;

pub(crate) use anyhow::Context;
pub(crate) use clap::{Args, Subcommand};
pub(crate) use fleet_control::plane::now_ms;

/// `k=v` arguments as a JSON object.
pub(crate) fn pairs(args: &[String]) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut map = serde_json::Map::new();
    for t in args.iter().filter(|t| !t.is_empty()) {
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("`{t}` is not k=v"))?;
        map.insert(k.trim().into(), v.trim().into());
    }
    Ok(map)
}

/// Asks QUESTION on the terminal; false unless the answer is y or yes. Without a
/// terminal it refuses rather than guess (use --yes).
pub(crate) fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "not a terminal: pass --yes to confirm"
    );
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

/// `90`, `90s`, `15m`, `2h`, `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s, 15m, 2h or 7d"))?;
    let millis = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(format!("`{text}`: unit `{unit}` is not ms, s, m, h or d")),
    };
    Ok(std::time::Duration::from_millis(millis))
}

pub(crate) fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
