//! Trainers: the commands training jobs may run, registered by an admin
//! (`fleetctl trainers add NAME --file TRAINER.toml`) and kept in `DATA_DIR/trainers.toml`
//! (mode 0600). An operator's job spec names a trainer and its parameters, never a
//! command: [`operator_spec`] refuses the keys that say what runs, and fills them from
//! the trainer.
//!
//! ```toml
//! description = "the claims model's deterministic trainer"
//! command = ["claims-fit", "--data", "{train_csv}", "--seed", "{seed}",
//!            "--epochs", "{param:epochs}", "--out", "{out}"]
//! executor = "local"             # or "kubernetes" (then `image` and `[kubernetes]`)
//! code_dir = "/srv/claims"       # a clone checked for the spec's code_commit
//! env = { OMP_NUM_THREADS = "2" }   # added to the trial's cleared environment
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::spec::{JobSpec, KubernetesSpec};

/// What a trainer runs, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trainer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "local")]
    pub executor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_dir: Option<PathBuf>,
    /// Added to the trial's environment (which is otherwise cleared).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

fn local() -> String {
    "local".into()
}

/// The keys of a job spec that say what runs: a trainer's, never an operator's.
pub const TRAINER_KEYS: [&str; 6] = [
    "command",
    "executor",
    "image",
    "kubernetes",
    "code_dir",
    "env",
];

impl Trainer {
    pub fn from_toml(text: &str) -> Result<Trainer, String> {
        let t: Trainer = toml::from_str(text).map_err(|e| format!("trainer: {}", e.message()))?;
        // Checked as the spec it makes would be.
        let mut probe = JobSpec::from_toml("model = \"probe\"\ncommand = [\"x\"]")?;
        t.apply(&mut probe);
        probe
            .validate()
            .map_err(|e| e.replace("job spec", "trainer"))?;
        Ok(t)
    }

    /// Puts what this trainer runs into `spec`.
    pub fn apply(&self, spec: &mut JobSpec) {
        spec.command = self.command.clone();
        spec.executor = self.executor.clone();
        spec.image = self.image.clone();
        spec.kubernetes = self.kubernetes.clone();
        spec.code_dir = self.code_dir.clone();
        spec.env = self.env.clone();
    }
}

/// The registered trainers, kept in a file.
#[derive(Debug)]
pub struct Trainers {
    path: PathBuf,
    map: RwLock<BTreeMap<String, Trainer>>,
}

impl Trainers {
    /// Reads `DATA_DIR/trainers.toml` (none yet: no trainers).
    pub fn open(data_dir: &Path) -> anyhow::Result<Trainers> {
        use anyhow::Context;
        let path = data_dir.join("trainers.toml");
        let map = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("{} is not a table of trainers", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Trainers {
            path,
            map: RwLock::new(map),
        })
    }

    pub fn get(&self, name: &str) -> Option<Trainer> {
        self.read().get(name).cloned()
    }

    pub fn list(&self) -> BTreeMap<String, Trainer> {
        self.read().clone()
    }

    /// Registers (or replaces) `name`; kept before it counts.
    pub fn put(&self, name: &str, trainer: Trainer) -> anyhow::Result<()> {
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "trainer name `{}`: 1-64 letters, digits, `-`, `_`, `.`",
            name.chars().take(80).collect::<String>()
        );
        let mut map = self.write();
        let mut next = map.clone();
        next.insert(name.to_string(), trainer);
        self.save(&next)?;
        *map = next;
        Ok(())
    }

    /// Removes `name`; whether it was registered.
    pub fn remove(&self, name: &str) -> anyhow::Result<bool> {
        let mut map = self.write();
        if !map.contains_key(name) {
            return Ok(false);
        }
        let mut next = map.clone();
        next.remove(name);
        self.save(&next)?;
        *map = next;
        Ok(true)
    }

    fn save(&self, map: &BTreeMap<String, Trainer>) -> anyhow::Result<()> {
        let text = toml::to_string(map)?;
        crate::output::write_atomic(&self.path, 0o600, |f| {
            use std::io::Write;
            f.write_all(text.as_bytes())?;
            Ok(())
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Trainer>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Trainer>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills what runs from `spec`'s trainer, as registered now.
    pub fn resolve(&self, spec: &mut JobSpec) -> Result<(), String> {
        let name = spec.trainer.clone().ok_or_else(|| {
            "the job spec names no trainer: add `trainer = \"NAME\"` (`fleetctl trainers list`; an admin registers one with `fleetctl trainers add`)".to_string()
        })?;
        let trainer = self.get(&name).ok_or_else(|| {
            format!("trainer `{name}` is not registered (`fleetctl trainers list`; an admin adds it with `fleetctl trainers add {name} --file TRAINER.toml`)")
        })?;
        trainer.apply(spec);
        spec.validate()
    }
}

/// An operator's job spec: refused when it says what runs (a command, an image, an
/// executor, a code folder, an environment) — a trainer says that — and resolved against
/// the trainer it names.
pub fn operator_spec(text: &str, trainers: &Trainers) -> Result<JobSpec, String> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| format!("job spec: {}", e.message()))?;
    if let Some(key) = TRAINER_KEYS.iter().find(|k| table.contains_key(**k)) {
        return Err(format!(
            "job spec: `{key}` is a trainer's, not a job's: name a registered trainer with `trainer = \"NAME\"` (an admin registers commands with `fleetctl trainers add`)"
        ));
    }
    let mut spec: JobSpec = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| format!("job spec: {}", e.message()))?;
    trainers.resolve(&mut spec)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_names_a_trainer_and_never_a_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trainers = Trainers::open(dir.path()).expect("open");
        let fit = Trainer::from_toml("command = [\"fit\", \"--out\", \"{out}\"]").expect("trainer");
        trainers.put("fit", fit).expect("put");
        let spec = operator_spec(
            "model = \"m\"\ntrainer = \"fit\"\n[params]\nepochs = 3",
            &trainers,
        )
        .expect("resolved");
        assert_eq!(spec.command, ["fit", "--out", "{out}"]);
        for bad in [
            "model = \"m\"\ntrainer = \"fit\"\ncommand = [\"sh\", \"-c\", \"cat admin.token\"]",
            "model = \"m\"\ntrainer = \"fit\"\nexecutor = \"kubernetes\"",
            "model = \"m\"\ntrainer = \"fit\"\nenv = { LD_PRELOAD = \"x\" }",
        ] {
            let e = operator_spec(bad, &trainers).expect_err(bad);
            assert!(e.contains("trainer"), "{e}");
        }
        let e = operator_spec("model = \"m\"", &trainers).expect_err("no trainer");
        assert!(e.contains("trainer = "), "{e}");
        let e =
            operator_spec("model = \"m\"\ntrainer = \"other\"", &trainers).expect_err("unknown");
        assert!(e.contains("not registered"), "{e}");
        // Kept across a restart, 0600; removal stops it.
        let again = Trainers::open(dir.path()).expect("reopen");
        assert!(again.get("fit").is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("trainers.toml"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(again.remove("fit").expect("removed"));
        assert!(operator_spec("model = \"m\"\ntrainer = \"fit\"", &again).is_err());
        assert!(
            Trainer::from_toml("executor = \"local\"").is_err(),
            "no command"
        );
        assert!(
            trainers
                .put("../x", Trainer::from_toml("command = [\"x\"]").expect("t"))
                .is_err()
        );
    }
}
