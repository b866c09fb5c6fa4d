//! Records the git commit this binary was built from, for `--version`.

fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FLEETML_GIT_COMMIT={commit}");
    // The PostgreSQL migrations are embedded (`refinery::embed_migrations!`): a new one
    // must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    // A new commit moves a ref; HEAD moves on checkout. Only files that exist are
    // named: cargo reruns a build script on every build for a missing one (a fresh clone
    // has no packed-refs until git packs).
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
