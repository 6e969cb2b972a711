//! Finding a model folder from what a user types: a folder, or a Hugging Face repo id
//! (`org/name`, `org/name@revision`) already downloaded into the local HF hub cache.
//!
//! The cache is read exactly as `huggingface_hub` lays it out, and never over the network
//! (the engine has no network code; `huggingface-cli download` fills the cache):
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     refs/<revision>                 a file holding the commit hash the revision points at
//!     snapshots/<commit hash>/...     the repo's files at that commit (symlinks into blobs/,
//!                                     or plain files where symlinks are not available)
//!     blobs/<file hash>               the files' contents
//! ```
//!
//! The cache root is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The local HF hub cache folder from the environment, as `huggingface_hub` picks it:
/// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (`None` when not
/// even a home folder is known).
pub fn cache_root() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    // USERPROFILE: where Windows keeps the home folder `~` stands for.
    cache_root_from(var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME").or_else(|| var("USERPROFILE")))
}

/// [`cache_root`] from given values of `HF_HUB_CACHE`, `HF_HOME` and the home folder (the
/// environment read apart, so the precedence is testable without touching it).
pub fn cache_root_from(
    hf_hub_cache: Option<PathBuf>,
    hf_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    hf_hub_cache
        .or_else(|| hf_home.map(|h| h.join("hub")))
        .or_else(|| home.map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// A model repo id as the hub spells it, with the revision asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name` (or a bare `name`, as the oldest hub models have).
    pub repo: String,
    /// The branch, tag or commit after `@`; `None` means `main`.
    pub revision: Option<String>,
}

impl RepoRef {
    /// Parses `org/name` or `org/name@revision`; `None` for anything that is not a repo id
    /// (a path with more parts, `..`, characters the hub does not allow in names).
    pub fn parse(spec: &str) -> Option<RepoRef> {
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (spec, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid_name_part(p)) {
            return None;
        }
        if let Some(rev) = revision {
            // Branch names may hold `/` (`refs/pr/1`); none may climb out of `refs/`.
            let ok = !rev.is_empty()
                && !rev.starts_with('/')
                && !rev.contains('\\')
                && rev.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
            if !ok {
                return None;
            }
        }
        Some(RepoRef { repo: repo.to_string(), revision: revision.map(String::from) })
    }

    /// The repo's folder in the cache: `models--org--name`.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// The revision, `main` when none was given.
    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// The hub's rule for a name part: letters, digits, `-`, `_`, `.`; no `--` or `..`; not
/// starting or ending with `-` or `.`; at most 96 characters.
fn valid_name_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 96
        && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !p.contains("--")
        && !p.contains("..")
        && !p.starts_with(['-', '.'])
        && !p.ends_with(['-', '.'])
}

/// The model folder `spec` names: `spec` itself when that path exists; otherwise the repo
/// id `org/name[@revision]` looked up in the local HF hub cache ([`cache_root`]). A model
/// found nowhere is an error listing every place looked at and how to download it.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_in(spec, cache_root().as_deref())
}

/// [`resolve_model`] with the cache root given (`None`: no cache known), so callers and
/// tests need not set environment variables.
///
/// The revision is the file `refs/<revision>` (default `main`), which holds a commit hash,
/// giving `snapshots/<hash>/`; a revision that is itself a snapshot's name (a commit hash)
/// is used directly; with no refs file and exactly one snapshot, that snapshot.
pub fn resolve_model_in(spec: &str, cache: Option<&Path>) -> Result<PathBuf> {
    let given = Path::new(spec);
    if given.exists() {
        return Ok(given.to_path_buf());
    }
    let mut looked = format!("\n  - `{spec}`: no such file or folder");
    let Some(repo) = RepoRef::parse(spec) else {
        looked.push_str(" (and not a hub repo id `org/name` or `org/name@revision`)");
        return Err(not_found(spec, looked, None));
    };
    let Some(cache) = cache else {
        looked.push_str("\n  - the HF hub cache: none known (set HF_HUB_CACHE or HF_HOME; no home folder either)");
        return Err(not_found(spec, looked, Some(&repo)));
    };
    let dir = cache.join(repo.folder_name());
    if !dir.is_dir() {
        let _ = write!(looked, "\n  - {}: no such folder (the repo is not in the HF hub cache)", dir.display());
        let refs = dir.join("refs").join(repo.revision_or_main());
        let _ = write!(looked, "\n  - {}: absent with it", refs.display());
        return Err(not_found(spec, looked, Some(&repo)));
    }
    let rev = repo.revision_or_main();
    let refs_file = dir.join("refs").join(rev);
    let snapshots = dir.join("snapshots");
    match std::fs::read_to_string(&refs_file) {
        Ok(text) => {
            let hash = text.trim();
            let snap = snapshots.join(hash);
            if !hash.is_empty() && !hash.contains(['/', '\\']) && snap.is_dir() {
                return Ok(snap);
            }
            let _ = write!(
                looked,
                "\n  - {}: holds `{hash}`, but {} is not a folder (an interrupted download?)",
                refs_file.display(),
                snap.display()
            );
        }
        Err(e) => {
            let _ = write!(looked, "\n  - {}: {e}", refs_file.display());
            // A commit hash given as the revision names its snapshot directly.
            let direct = snapshots.join(rev);
            if repo.revision.is_some() {
                if direct.is_dir() {
                    return Ok(direct);
                }
                let _ = write!(looked, "\n  - {}: no such folder", direct.display());
            } else {
                // No `refs/main` (a cache filled by hand or by a tool that writes only
                // snapshots): one snapshot is unambiguous, several are not.
                let found = snapshot_names(&snapshots);
                match &found[..] {
                    [one] => return Ok(snapshots.join(one)),
                    [] => {
                        let _ = write!(looked, "\n  - {}: no snapshot", snapshots.display());
                    }
                    many => {
                        let _ = write!(
                            looked,
                            "\n  - {}: {} snapshots ({}); name one as `{}@<hash>`",
                            snapshots.display(),
                            many.len(),
                            many.join(", "),
                            repo.repo
                        );
                    }
                }
            }
        }
    }
    Err(not_found(spec, looked, Some(&repo)))
}

/// The snapshot folders' names, sorted.
fn snapshot_names(snapshots: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn not_found(spec: &str, looked: String, repo: Option<&RepoRef>) -> Error {
    let mut msg = format!("model not found; looked at:{looked}");
    if let Some(r) = repo {
        let rev = r.revision.as_deref().map(|v| format!(" --revision {v}")).unwrap_or_default();
        let _ = write!(msg, "\n  to get it: huggingface-cli download {}{rev}", r.repo);
    }
    Error::Checkpoint { path: spec.to_string(), msg, source: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh temp folder for one test.
    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moe-hub-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    /// `models--org--tiny` with one snapshot whose config.json is a symlink into blobs/
    /// (plain file where symlinks are unavailable), and `refs/main` when `with_ref`.
    fn fake_repo(cache: &Path, hash: &str, with_ref: bool) -> PathBuf {
        let repo = cache.join("models--org--tiny");
        let snap = repo.join("snapshots").join(hash);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        let blob = repo.join("blobs").join(format!("blob-{hash}"));
        std::fs::write(&blob, "{}").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(blob.file_name().unwrap()), snap.join("config.json"))
            .unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snap.join("config.json")).unwrap();
        if with_ref {
            std::fs::create_dir_all(repo.join("refs")).unwrap();
            // huggingface_hub writes the hash without a newline; a hand-written one has one.
            std::fs::write(repo.join("refs").join("main"), format!("{hash}\n")).unwrap();
        }
        snap
    }

    #[test]
    fn an_existing_path_is_used_as_given() {
        let d = tmp("path");
        let s = d.to_str().unwrap();
        assert_eq!(resolve_model_in(s, None).unwrap(), d);
    }

    #[test]
    fn refs_main_names_the_snapshot_and_its_files_resolve_through_the_symlinks() {
        let cache = tmp("refs");
        let snap = fake_repo(&cache, HASH, true);
        let got = resolve_model_in("org/tiny", Some(&cache)).unwrap();
        assert_eq!(got, snap);
        assert_eq!(std::fs::read_to_string(got.join("config.json")).unwrap(), "{}");
    }

    #[test]
    fn a_revision_is_a_refs_file_or_a_snapshot_hash() {
        let cache = tmp("rev");
        let snap = fake_repo(&cache, HASH, true);
        let other = fake_repo(&cache, "fedcba9876543210fedcba9876543210fedcba98", false);
        std::fs::write(cache.join("models--org--tiny/refs/v1"), "fedcba9876543210fedcba9876543210fedcba98").unwrap();
        assert_eq!(resolve_model_in("org/tiny@v1", Some(&cache)).unwrap(), other);
        assert_eq!(resolve_model_in(&format!("org/tiny@{HASH}"), Some(&cache)).unwrap(), snap);
        assert_eq!(resolve_model_in("org/tiny", Some(&cache)).unwrap(), snap);
    }

    #[test]
    fn without_refs_one_snapshot_is_used_and_two_are_ambiguous() {
        let cache = tmp("norefs");
        let snap = fake_repo(&cache, HASH, false);
        assert_eq!(resolve_model_in("org/tiny", Some(&cache)).unwrap(), snap);
        fake_repo(&cache, "fedcba9876543210fedcba9876543210fedcba98", false);
        let e = resolve_model_in("org/tiny", Some(&cache)).unwrap_err().to_string();
        assert!(e.contains("2 snapshots") && e.contains("org/tiny@<hash>"), "{e}");
    }

    #[test]
    fn a_missing_model_says_where_it_looked_and_how_to_get_it() {
        let cache = tmp("missing");
        let e = resolve_model_in("org/absent@v2", Some(&cache)).unwrap_err().to_string();
        assert!(e.contains("`org/absent@v2`: no such file or folder"), "{e}");
        assert!(e.contains(&cache.join("models--org--absent").display().to_string()), "{e}");
        assert!(e.contains(&cache.join("models--org--absent/refs/v2").display().to_string()), "{e}");
        assert!(e.contains("huggingface-cli download org/absent --revision v2"), "{e}");
        // The repo folder is there but its refs file and snapshot are not.
        std::fs::create_dir_all(cache.join("models--org--absent/snapshots")).unwrap();
        let e = resolve_model_in("org/absent", Some(&cache)).unwrap_err().to_string();
        assert!(e.contains(&cache.join("models--org--absent/refs/main").display().to_string()), "{e}");
        assert!(e.contains("no snapshot"), "{e}");
        // A refs file pointing at a snapshot that is not there.
        std::fs::create_dir_all(cache.join("models--org--absent/refs")).unwrap();
        std::fs::write(cache.join("models--org--absent/refs/main"), HASH).unwrap();
        let e = resolve_model_in("org/absent", Some(&cache)).unwrap_err().to_string();
        assert!(e.contains(&format!("holds `{HASH}`")), "{e}");
    }

    #[test]
    fn a_path_that_is_not_a_repo_id_is_reported_as_a_path() {
        let e = resolve_model_in("no/such/folder", Some(Path::new("/nonexistent"))).unwrap_err().to_string();
        assert!(e.contains("not a hub repo id"), "{e}");
        for bad in ["../x", "a/..", "org/na--me", "-org/x", "org/x@", "org/x@../../etc", "org/x@/abs", "a/b/c"] {
            assert_eq!(RepoRef::parse(bad), None, "{bad}");
        }
        assert_eq!(
            RepoRef::parse("deepseek-ai/DeepSeek-V3@refs/pr/1"),
            Some(RepoRef { repo: "deepseek-ai/DeepSeek-V3".into(), revision: Some("refs/pr/1".into()) })
        );
        assert_eq!(RepoRef::parse("gpt2").map(|r| r.folder_name()), Some("models--gpt2".into()));
    }

    #[test]
    fn the_cache_root_is_hf_hub_cache_then_hf_home_then_home() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(cache_root_from(p("/c"), p("/h"), p("/u")), p("/c"));
        assert_eq!(cache_root_from(None, p("/h"), p("/u")), p("/h/hub"));
        assert_eq!(cache_root_from(None, None, p("/u")), p("/u/.cache/huggingface/hub"));
        assert_eq!(cache_root_from(None, None, None), None);
    }
}
