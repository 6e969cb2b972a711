//! The `moe` command as a user meets it: flags that are refused name themselves, `--help`
//! lists the allowed values, a closed output pipe is not a panic, a job too large for the
//! machine is refused before it allocates, and `moe check` on broken cases (a corpus made
//! here from the golden cases: bad JSON and configs, absurd sizes, forged or truncated
//! safetensors, wrong dtypes and shapes, NaN/Inf in inputs, weights and noise) exits 0 or
//! 1 for every one of them, never panicking, aborting or hanging, and passes none. Model
//! folders (tests/golden-models, and copies of them in a hub-cache layout made here) are
//! described by `moe info --model` and run by `moe run --model`; a missing repo id, a dense
//! layer, a bad `--input` and a layer that cannot load are errors naming what is wrong.

use moe_engine::import::{save_safetensors, Checkpoint};
use moe_engine::HostTensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn moe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moe"));
    c.env("MOE_LOG", "error");
    c
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `cmd` to completion within `limit`, killing it past that (a hang fails the test).
fn run(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn moe");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).ok();
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).ok();
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output { status, stdout: o.join().unwrap(), stderr: e.join().unwrap() }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts clap refused the command (exit 2) naming `flag`.
#[track_caller]
fn refused(args: &[&str], flag: &str) {
    let mut c = moe();
    c.args(args);
    let out = run(c, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{args:?} ran");
    assert!(err.contains(flag), "{args:?}: stderr does not name {flag}:\n{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn zero_counts_and_out_of_range_flags_are_refused_naming_the_flag() {
    refused(&["bench", "layer", "--iters", "0"], "--iters");
    refused(&["bench", "layer", "--tokens", "0"], "--tokens");
    refused(&["bench", "layer", "--threads", "0"], "--threads");
    refused(&["bench", "layer", "--ep", "0"], "--ep");
    refused(&["bench", "layer", "--top-k", "9", "--experts", "8"], "--top-k");
    refused(&["bench", "layer", "--ep", "3", "--experts", "8"], "--ep");
    refused(&["bench", "layer", "--backend", "tpu"], "--backend");
    refused(&["bench", "layer", "--dtype", "f64"], "--dtype");
    refused(&["bench", "layer", "--fresh-inputs", "--train"], "--fresh-inputs");
    refused(&["bench", "machine", "--mib", "0"], "--mib");
    refused(&["bench", "machine", "--passes", "0"], "--passes");
    refused(&["bench", "machine", "--mib", "1048576"], "--mib");
    refused(&["run", "--steps", "0"], "--steps");
    refused(&["run", "--tokens", "0"], "--tokens");
    refused(&["check", "--ep", "0", "x"], "--ep");
    refused(&["check", "--ep-timeout", "18446744073709551615", "x"], "--ep-timeout");
    refused(&["check", "--ep", "4", "--ep-per-node", "3", "x"], "--ep-per-node");
}

#[test]
fn help_lists_the_allowed_values() {
    for (args, values) in [
        (&["check", "-h"][..], "cpu, wgpu, cuda"),
        (&["bench", "layer", "-h"][..], "f32, f16, bf16"),
        (&["run", "-h"][..], "auto, cpu, wgpu, cuda"),
    ] {
        let mut c = moe();
        c.args(args);
        let out = run(c, Duration::from_secs(30));
        assert!(text(&out.stdout).contains(values), "{args:?} --help does not list {values}:\n{}", text(&out.stdout));
    }
}

#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    let mut child =
        moe().args(["check"]).arg(golden()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    // `| head -1`: read one line, then close the pipe.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("PASS"), "{first}");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success() || status.code() == Some(1), "{status:?}");
}

#[test]
fn a_deepseek_v3_shaped_bench_on_a_small_machine_is_refused_naming_the_size() {
    // 256 experts of 3 · 7168 · 2048 f32 weights: 45 GiB before anything else.
    let need = 256u64 * 3 * 7168 * 2048 * 4;
    match moe_engine::memory::host_available() {
        Some(free) if free < need => {}
        other => {
            eprintln!(
                "SKIP a_deepseek_v3_shaped_bench_on_a_small_machine_is_refused: this host has {other:?} bytes free"
            );
            return;
        }
    }
    let mut c = moe();
    c.args(["bench", "layer", "--hidden", "7168", "--ffn", "2048", "--experts", "256", "--top-k", "8"]);
    let start = Instant::now();
    let out = run(c, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}: it allocated first", start.elapsed());
    assert!(err.contains("GiB") && err.contains("available on this host"), "{err}");
}

#[test]
fn a_bench_with_fresh_inputs_counts_the_experts_each_forward_touched() {
    // One token, top-1 of 64 experts: a new input each forward routes one token to one
    // expert (so one touched), as the same input does; over many tokens most are touched.
    for (tokens, fresh, lo, hi) in [("1", true, 1.0, 1.0), ("1", false, 1.0, 1.0), ("256", true, 40.0, 64.0)] {
        let mut c = moe();
        c.args(["bench", "layer", "--hidden", "32", "--ffn", "64", "--experts", "64", "--top-k", "1"]);
        c.args(["--tokens", tokens, "--iters", "3", "--json"]);
        if fresh {
            c.arg("--fresh-inputs");
        }
        let out = run(c, Duration::from_secs(60));
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(v["fresh_inputs"], fresh, "{stdout}");
        let touched = v["experts_touched"].as_f64().unwrap_or_else(|| panic!("{stdout}"));
        assert!((lo..=hi).contains(&touched), "T {tokens}: {touched} experts touched, expected {lo}..={hi}");
    }
}

#[test]
fn an_expert_parallel_bench_reports_the_exchange_on_cpu_and_wgpu_ranks() {
    for backend in ["cpu", "wgpu"] {
        let mut c = moe();
        c.args(["bench", "layer", "--backend", backend, "--hidden", "32", "--ffn", "64", "--experts", "4"]);
        c.args(["--tokens", "16", "--iters", "2", "--ep", "2", "--json"]);
        let out = run(c, Duration::from_secs(120));
        let (stdout, err) = (text(&out.stdout), text(&out.stderr));
        if backend == "wgpu" && out.status.code() != Some(0) && std::env::var("CI").is_err() {
            eprintln!("SKIP the wgpu half of an_expert_parallel_bench_reports_the_exchange: {err}");
            continue;
        }
        assert_eq!(out.status.code(), Some(0), "{backend}: {err}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(v["ep"], 2, "{stdout}");
        let (exchange, median) = (v["exchange_median_ms"].as_f64().unwrap(), v["median_ms"].as_f64().unwrap());
        assert!(exchange > 0.0 && exchange <= median, "{backend}: exchange {exchange} of {median} ms");
    }
}

#[test]
fn a_folder_with_one_bad_case_runs_the_others_and_reports_it_failed() {
    let dir = tmp("one_bad_case");
    for case in ["01_ds_gate_top1_eval", "22_hf_mixtral"] {
        copy_case(&golden().join(case), &dir.join(case));
    }
    copy_case(&golden().join("18_ds_moe_top2_mlp_eval"), &dir.join("10_broken"));
    std::fs::write(dir.join("10_broken/case.json"), "{ not json").unwrap();
    let mut c = moe();
    c.arg("check").arg(&dir);
    let out = run(c, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("2 passed, 1 failed"), "{stdout}");
    assert!(stdout.contains("10_broken") && stdout.contains("caused by"), "the error and its cause:\n{stdout}");
}

// ------------------------------------------------------------------ model folders

fn golden_model(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden-models").join(case).join("model")
}

/// Runs `moe` with `args` (and `env`), expecting exit status `code`; returns (stdout, stderr).
#[track_caller]
fn moe_ok(args: &[&str], env: &[(&str, &Path)], code: i32) -> (String, String) {
    let mut c = moe();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run(c, Duration::from_secs(120));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "{args:?}:\n{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}:\n{stderr}");
    (stdout, stderr)
}

/// The number after `key` in `s` (thousands separators dropped).
#[track_caller]
fn number_after(s: &str, key: &str) -> u64 {
    let at = s.find(key).unwrap_or_else(|| panic!("no `{key}` in:\n{s}")) + key.len();
    let digits: String =
        s[at..].chars().take_while(|c| c.is_ascii_digit() || *c == ',').filter(|c| *c != ',').collect();
    digits.parse().unwrap_or_else(|_| panic!("no number after `{key}` in:\n{s}"))
}

#[test]
fn info_describes_a_model_folders_moe_layers_and_its_bytes_on_disk() {
    for (case, family, layers, experts, topk, routing) in [
        (
            "01_mixtral",
            "Mixtral (model_type mixtral)",
            "MoE: 2 layers (0-1)",
            "8 routed (GLU (silu)",
            "top-k: 3 of 8",
            "softmax scores; top-k choice; weights renormalised",
        ),
        (
            "06_deepseek_v3",
            "DeepSeek-V3 (model_type deepseek_v3)",
            "MoE: layer 1; dense: layer 0",
            "shared: one block (GLU (silu), intermediate 16), added to the routed output",
            "top-k: 4 of 16",
            "sigmoid scores; choice on score + selection bias within the 2 best of 4 groups",
        ),
        (
            "18_granitemoeshared",
            "Granite-MoE shared (model_type granitemoeshared)",
            "MoE: 2 layers (0-1)",
            "shared: one block (GLU (silu), intermediate 40)",
            "top-k: 3 of 8",
            "softmax scores",
        ),
    ] {
        let dir = golden_model(case);
        let (out, _) = moe_ok(&["info", "--model", dir.to_str().unwrap()], &[], 0);
        for want in [family, layers, experts, topk, routing] {
            assert!(out.contains(want), "{case}: no `{want}` in:\n{out}");
        }
        // These checkpoints are plain f32 with no zero-compute experts: every tensor of the
        // MoE blocks is a parameter, so the headers' count is the spec's.
        let params = number_after(&out[out.find("parameters in the ").expect("a parameter line")..], ": ");
        let disk = &out[out.find("safetensors headers): ").expect("an on-disk line")..];
        assert_eq!(number_after(disk, "tensors, "), params, "{case}:\n{out}");
        assert!(out.contains(": F32 "), "{case}:\n{out}");
        assert!(number_after(&out, "active per token: ") < params, "{case}:\n{out}");
    }
}

#[test]
fn info_of_a_bf16_checkpoint_counts_its_bytes_by_dtype() {
    let dir = golden_model("33_qwen3_moe_bf16");
    let (out, _) = moe_ok(&["info", "--model", dir.to_str().unwrap()], &[], 0);
    // 25,088 parameters in bf16: 2 bytes each.
    assert!(out.contains("25,088 elements, 49.0 KiB: BF16 49.0 KiB"), "{out}");
}

#[test]
fn run_runs_every_moe_layer_of_a_model_folder_on_cpu_and_charts_the_load() {
    // (case, its MoE layers, the mean routes per expert: 8 tokens · k / E, dropless).
    for (case, layers, mean) in [
        ("01_mixtral", &[0, 1][..], "3.00"),
        ("06_deepseek_v3", &[1], "2.00"),
        ("18_granitemoeshared", &[0, 1], "3.00"),
    ] {
        let dir = golden_model(case);
        let svg = tmp(&format!("run_{case}")).join("load.svg");
        let args = ["run", "--model", dir.to_str().unwrap(), "--tokens", "8", "--backend", "cpu"];
        let (out, _) = moe_ok(&[&args[..], &["--svg", svg.to_str().unwrap()]].concat(), &[], 0);
        for l in layers {
            let line = out
                .lines()
                .find(|x| x.starts_with(&format!("layer {l}: ")))
                .unwrap_or_else(|| panic!("{case}: no layer {l}:\n{out}"));
            assert!(line.contains("tokens/s") && line.contains("dropped tokens 0"), "{case}: {line}");
            assert!(line.contains(&format!(" / mean {mean} / max ")), "{case}: {line}");
        }
        assert_eq!(out.lines().filter(|x| x.starts_with("layer ")).count(), layers.len(), "{case}:\n{out}");
        let chart = std::fs::read_to_string(&svg).unwrap_or_else(|e| panic!("{case}: {e}\n{out}"));
        assert!(chart.starts_with("<svg") && layers.iter().all(|l| chart.contains(&format!("layer {l}: "))), "{case}");
    }
    // One layer, seeded: the same seed routes the same.
    let dir = golden_model("01_mixtral");
    let one =
        ["run", "--model", dir.to_str().unwrap(), "--layer", "1", "--tokens", "8", "--backend", "cpu", "--seed", "5"];
    let loads =
        |out: &str| out.lines().filter(|l| l.starts_with("  routes per expert")).map(String::from).collect::<Vec<_>>();
    let (a, _) = moe_ok(&one, &[], 0);
    let (b, _) = moe_ok(&one, &[], 0);
    assert!(a.contains("1 MoE layer(s)") && !a.contains("layer 0: "), "{a}");
    assert_eq!(loads(&a), loads(&b));
    assert_eq!(loads(&a).len(), 1, "{a}");
}

#[test]
fn run_stores_weights_in_the_dtype_asked_where_the_backend_has_it() {
    let dir = golden_model("06_deepseek_v3");
    let base = ["run", "--model", dir.to_str().unwrap(), "--tokens", "8", "--steps", "1"];
    let cpu = moe_cpu::CpuBackend::new(Some(1)).unwrap();
    let (code, want) = if moe_engine::Device::capabilities(&cpu).storage_dtypes.contains(&moe_engine::DType::BF16) {
        (0, "bf16 weights")
    } else {
        (1, "--dtype: backend cpu stores")
    };
    let (out, err) = moe_ok(&[&base[..], &["--backend", "cpu", "--dtype", "bf16"]].concat(), &[], code);
    assert!(out.contains(want) || err.contains(want), "{out}{err}");
    if moe_wgpu::list_adapters().is_empty() {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true and no wgpu adapter");
        eprintln!("SKIP the wgpu half of run_stores_weights_in_the_dtype_asked: no adapter");
        return;
    }
    let (out, _) = moe_ok(&[&base[..], &["--backend", "wgpu", "--dtype", "bf16"]].concat(), &[], 0);
    assert!(out.contains("on wgpu") && out.contains("bf16 weights"), "{out}");
    // 8 tokens, k = 4 of 16 experts, dropless: 2 routes per expert on average.
    assert!(out.contains("layer 1: ") && out.contains(" / mean 2.00 / ") && out.contains("dropped tokens 0"), "{out}");
}

/// A hub cache holding `case`'s model folder as `tiny-org/<case>`: `refs/main` naming a
/// snapshot whose files are symlinks into `blobs/`, as huggingface_hub writes them.
fn hub_cache(root: &Path, case: &str) -> PathBuf {
    let hash = "4f1c0e7d2b9a8c6e5d4f3a2b1c0d9e8f7a6b5c4d";
    let repo = root.join(format!("models--tiny-org--{case}"));
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    for f in std::fs::read_dir(golden_model(case)).unwrap() {
        let f = f.unwrap().path();
        let blob = repo.join("blobs").join(format!("blob-{}", f.file_name().unwrap().to_str().unwrap()));
        std::fs::copy(&f, &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(blob.file_name().unwrap()),
            snap.join(f.file_name().unwrap()),
        )
        .unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    snap
}

#[test]
fn a_repo_id_is_found_in_the_hub_cache_through_hf_hub_cache_or_hf_home() {
    let root = tmp("hub_cache");
    let cache = root.join("hub");
    let snap = hub_cache(&cache, "06_deepseek_v3");
    let id = "tiny-org/06_deepseek_v3";
    for env in [("HF_HUB_CACHE", cache.as_path()), ("HF_HOME", root.as_path())] {
        let (out, _) = moe_ok(&["info", "--model", id], &[env], 0);
        assert!(out.contains(&format!("model: {}", snap.display())), "{env:?}:\n{out}");
        assert!(out.contains("DeepSeek-V3 (model_type deepseek_v3)"), "{out}");
    }
    let (out, _) = moe_ok(&["run", "--model", id, "--tokens", "8", "--backend", "cpu"], &[("HF_HUB_CACHE", &cache)], 0);
    assert!(out.contains("layer 1: ") && out.contains("dropped tokens 0"), "{out}");
}

#[test]
fn a_missing_repo_id_says_where_it_looked_and_how_to_get_it() {
    let cache = tmp("empty_hub_cache");
    let (_, err) = moe_ok(&["info", "--model", "nobody/nothing"], &[("HF_HUB_CACHE", &cache)], 1);
    for want in [
        "`nobody/nothing`: no such file or folder".to_string(),
        cache.join("models--nobody--nothing").display().to_string(),
        cache.join("models--nobody--nothing/refs/main").display().to_string(),
        "huggingface-cli download nobody/nothing".to_string(),
    ] {
        assert!(err.contains(&want), "no `{want}` in:\n{err}");
    }
    let (_, err) = moe_ok(&["run", "--model", "nobody/nothing@v1", "--backend", "cpu"], &[("HF_HUB_CACHE", &cache)], 1);
    assert!(err.contains("huggingface-cli download nobody/nothing --revision v1"), "{err}");
}

#[test]
fn a_dense_layer_is_refused_naming_the_moe_layers() {
    let dir = golden_model("02_qwen2_moe");
    let (_, err) = moe_ok(&["run", "--model", dir.to_str().unwrap(), "--layer", "0", "--backend", "cpu"], &[], 1);
    assert!(
        err.contains("--layer") && err.contains("layer 0 is a dense MLP layer") && err.contains("the MoE layers are 1"),
        "{err}"
    );
    let (_, err) = moe_ok(&["run", "--model", dir.to_str().unwrap(), "--layer", "9", "--backend", "cpu"], &[], 1);
    assert!(err.contains("--layer") && err.contains("past the model's 2 layers"), "{err}");
    refused(&["run", "--model", dir.to_str().unwrap(), "--layer", "first"], "--layer");
    // The model flags mean nothing to the demo stack.
    refused(&["run", "--layer", "1"], "--model");
    refused(&["run", "--input", "x.safetensors"], "--model");
}

#[test]
fn run_takes_hidden_states_from_a_safetensors_file_and_checks_their_name_and_shape() {
    // A golden case's tensors hold its input as `input/x` [11, 48].
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden-models/01_mixtral/tensors.safetensors");
    let dir = golden_model("01_mixtral");
    let base = ["run", "--model", dir.to_str().unwrap(), "--backend", "cpu", "--steps", "1", "--input"];
    let (out, _) = moe_ok(&[&base[..], &[case.to_str().unwrap()]].concat(), &[], 0);
    assert!(out.contains("11 tokens of given hidden states"), "{out}");
    let d = tmp("bad_input");
    let wrong = d.join("wrong_shape.safetensors");
    let m: Tensors = [("hidden_states".to_string(), HostTensor::zeros(&[4, 7]).unwrap())].into();
    save_safetensors(&wrong, &m).unwrap();
    let (_, err) = moe_ok(&[&base[..], &[wrong.to_str().unwrap()]].concat(), &[], 1);
    assert!(
        err.contains("--input")
            && err.contains("`hidden_states`")
            && err.contains("[tokens, 48]")
            && err.contains("[4, 7]"),
        "{err}"
    );
    let other = d.join("other_name.safetensors");
    let m: Tensors = [("h".to_string(), HostTensor::zeros(&[4, 48]).unwrap())].into();
    save_safetensors(&other, &m).unwrap();
    let (_, err) = moe_ok(&[&base[..], &[other.to_str().unwrap()]].concat(), &[], 1);
    assert!(
        err.contains("--input") && err.contains("no tensor `hidden_states`") && err.contains("it holds: h"),
        "{err}"
    );
    let (_, err) = moe_ok(&[&base[..], &[d.join("absent.safetensors").to_str().unwrap()]].concat(), &[], 1);
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn a_layer_that_cannot_load_is_an_error_naming_it_after_the_layers_before_it_ran() {
    let dir = tmp("layer_missing_tensor");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(golden_model("01_mixtral").join(f), dir.join(f)).unwrap();
    }
    let ck = Checkpoint::load(&golden_model("01_mixtral").join("model.safetensors")).unwrap();
    let mut m: Tensors = ck.iter().unwrap().map(|(k, v)| (k.into(), v.clone())).collect();
    let gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    assert!(m.remove(gone).is_some(), "01_mixtral has no {gone}");
    save_safetensors(&dir.join("model.safetensors"), &m).unwrap();
    let (out, err) = moe_ok(&["run", "--model", dir.to_str().unwrap(), "--tokens", "8", "--backend", "cpu"], &[], 1);
    assert!(out.contains("layer 0: "), "{out}");
    assert!(err.contains(&format!("layer 1 of {}", dir.display())) && err.contains(gone), "{err}");
}

#[test]
fn run_without_a_model_still_runs_the_demo_stack() {
    let svg = tmp("demo_svg").join("demo.svg");
    let (out, _) =
        moe_ok(&["run", "--backend", "cpu", "--tokens", "32", "--steps", "1", "--svg", svg.to_str().unwrap()], &[], 0);
    assert!(out.contains("PR-MoE demo stack on cpu") && out.contains("throughput:"), "{out}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("layer 0: "));
}

// ------------------------------------------------------------------ the broken corpus

fn copy_case(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["case.json", "tensors.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// The tensors of a case, by key.
type Tensors = BTreeMap<String, HostTensor>;

/// How a case is broken.
enum Break {
    /// An edit of case.json.
    Meta(Box<dyn Fn(&mut Value)>),
    /// An edit of the tensors.
    Tensors(Box<dyn Fn(&mut Tensors)>),
    /// case.json replaced by these bytes.
    MetaBytes(Vec<u8>),
    /// tensors.safetensors replaced by a function of its bytes.
    FileBytes(Box<dyn Fn(Vec<u8>) -> Vec<u8>>),
}

fn meta(f: impl Fn(&mut Value) + 'static) -> Break {
    Break::Meta(Box::new(f))
}

fn tensors(f: impl Fn(&mut Tensors) + 'static) -> Break {
    Break::Tensors(Box::new(f))
}

fn cfg(key: &'static str, v: Value) -> Break {
    meta(move |m| m["config"][key] = v.clone())
}

fn poke(key: &'static str, at: usize, v: f32) -> Break {
    tensors(move |m| {
        let t = m.remove(key).unwrap_or_else(|| panic!("no {key}"));
        let shape = t.shape().to_vec();
        let mut d = t.into_f32(key).unwrap();
        let i = at.min(d.len() - 1);
        d[i] = v;
        m.insert(key.into(), HostTensor::f32(&shape, d).unwrap());
    })
}

fn reshape(key: &'static str, shape: &'static [usize]) -> Break {
    tensors(move |m| {
        let t = m.remove(key).unwrap();
        let n: usize = shape.iter().product();
        let mut d = t.into_f32(key).unwrap();
        d.resize(n, 0.5);
        m.insert(key.into(), HostTensor::f32(shape, d).unwrap());
    })
}

/// Every broken variant: (name, the golden case it starts from, the break).
fn corpus() -> Vec<(String, &'static str, Break)> {
    let (ds, mx, gate, v3, sw) = (
        "18_ds_moe_top2_mlp_eval",
        "22_hf_mixtral",
        "06_ds_gate_top1_train_rts",
        "26_hf_deepseek_v3_grouped",
        "28_hf_switch_capacity",
    );
    let mut v: Vec<(String, &'static str, Break)> = Vec::new();
    let mut add = |name: &str, case: &'static str, b: Break| v.push((name.to_string(), case, b));
    // case.json as a file.
    add("json_not_json", ds, Break::MetaBytes(b"{ \"format\": 1,".to_vec()));
    add("json_empty", ds, Break::MetaBytes(Vec::new()));
    add("json_array", ds, Break::MetaBytes(b"[1, 2, 3]".to_vec()));
    add("json_deep_nesting", ds, Break::MetaBytes([b"[".repeat(100_000), b"]".repeat(100_000)].concat()));
    add("json_not_utf8", ds, Break::MetaBytes(vec![0xff, 0xfe, 0x00, 0x7b]));
    add("json_huge_number", ds, Break::MetaBytes(b"{\"format\": 1e400}".to_vec()));
    // case.json keys.
    add("format_99", ds, meta(|m| m["format"] = 99.into()));
    add("format_string", ds, meta(|m| m["format"] = "1".into()));
    add("kind_unknown", ds, meta(|m| m["kind"] = "hf.llama".into()));
    add("kind_mismatch", mx, meta(|m| m["kind"] = "hf.qwen3_moe".into()));
    add("mode_unknown", ds, meta(|m| m["mode"] = "serve".into()));
    add("expected_empty", ds, meta(|m| m["expected"] = json!({})));
    add("expected_missing", ds, meta(|m| drop(m.as_object_mut().unwrap().remove("expected"))));
    add("expected_unknown", ds, meta(|m| m["expected"]["z"] = "expect/y".into()));
    add("expected_wrong_kind", gate, meta(|m| m["expected"]["y"] = "expect/gates".into()));
    add("expected_missing_tensor", ds, meta(|m| m["expected"]["y"] = "expect/none".into()));
    add("expected_not_string", ds, meta(|m| m["expected"]["y"] = 3.into()));
    add("inputs_missing_x", ds, meta(|m| m["inputs"] = json!({})));
    add("inputs_x_missing_tensor", ds, meta(|m| m["inputs"]["x"] = "input/none".into()));
    add("noise_unknown", gate, meta(|m| m["noise"]["uniform"] = "noise/rts_uniform".into()));
    add("tolerance_missing", ds, meta(|m| drop(m.as_object_mut().unwrap().remove("tolerance"))));
    add("tolerance_negative", ds, meta(|m| m["tolerance"]["rel_l2"] = (-0.5).into()));
    add("tolerance_huge", ds, meta(|m| m["tolerance"]["rel_l2"] = 1e30.into()));
    add("tolerance_exact_unknown", ds, meta(|m| m["tolerance"]["exact"] = json!(["indices"])));
    add("config_missing", ds, meta(|m| drop(m.as_object_mut().unwrap().remove("config"))));
    add("backward_garbage", ds, meta(|m| m["backward"] = json!([1, 2])));
    add("backward_loss_unknown", ds, meta(|m| m["backward"]["loss"] = "mean(y)".into()));
    add("backward_dx_missing", mx, meta(|m| m["backward"]["dx"] = "grad/none".into()));
    add("inputs_as_array", ds, meta(|m| m["inputs"] = json!(["input/x"])));
    // DeepSpeed configs.
    add("ds_k_zero", ds, cfg("k", 0.into()));
    add("ds_k_null", ds, cfg("k", Value::Null));
    add("gate_model_dim_string", gate, cfg("model_dim", "16".into()));
    add("gate_num_experts_missing", gate, meta(|m| drop(m["config"].as_object_mut().unwrap().remove("num_experts"))));
    add("ds_k_negative", ds, cfg("k", (-1).into()));
    add("ds_k_past_e", ds, cfg("k", 99.into()));
    add("ds_k_string", ds, cfg("k", "two".into()));
    add("ds_capacity_factor_zero", ds, cfg("capacity_factor", 0.into()));
    add("ds_eval_capacity_factor_huge", ds, cfg("eval_capacity_factor", 1e300.into()));
    add("ds_min_capacity_negative", ds, cfg("min_capacity", (-4).into()));
    add("ds_min_capacity_huge", ds, cfg("min_capacity", 10_000_000_000_000_000_000u64.into()));
    add("ds_hidden_zero", ds, cfg("hidden_size", 0.into()));
    add("ds_hidden_mismatch", ds, cfg("hidden_size", 17.into()));
    add("ds_hidden_huge", ds, cfg("hidden_size", 1_000_000_000_000u64.into()));
    add("ds_experts_zero", ds, cfg("num_experts", 0.into()));
    add("ds_experts_mismatch", ds, cfg("num_experts", 3.into()));
    add("ds_experts_billion", ds, cfg("num_experts", 1_000_000_000u64.into()));
    add("ds_experts_max", ds, cfg("num_experts", u64::MAX.into()));
    add("ds_ep_size", ds, cfg("ep_size", 3.into()));
    add("ds_drop_policy", ds, cfg("drop_policy", "random".into()));
    add("ds_noisy_policy", ds, cfg("noisy_gate_policy", "Magic".into()));
    add("ds_residual_without_tensors", ds, cfg("use_residual", true.into()));
    add("ds_expert_type", ds, meta(|m| m["config"]["expert"]["type"] = "conv".into()));
    add("ds_expert_ffn_zero", ds, meta(|m| m["config"]["expert"]["ffn_hidden"] = 0.into()));
    add("ds_expert_ffn_mismatch", ds, meta(|m| m["config"]["expert"]["ffn_hidden"] = 49.into()));
    add("ds_expert_ffn_huge", ds, meta(|m| m["config"]["expert"]["ffn_hidden"] = u64::MAX.into()));
    add("ds_expert_missing", ds, meta(|m| drop(m["config"].as_object_mut().unwrap().remove("expert"))));
    add("gate_experts_mismatch", gate, cfg("num_experts", 4.into()));
    add("gate_k_past_e", gate, cfg("k", 9.into()));
    add("gate_min_capacity_past_tokens", gate, cfg("min_capacity", 1_000_000.into()));
    // HF configs.
    add("hf_experts_billion", mx, cfg("num_local_experts", 1_000_000_000u64.into()));
    add("hf_experts_zero", mx, cfg("num_local_experts", 0.into()));
    add("hf_k_zero", mx, cfg("num_experts_per_tok", 0.into()));
    add("hf_k_past_e", mx, cfg("num_experts_per_tok", 100.into()));
    add("hf_hidden_mismatch", mx, cfg("hidden_size", 31.into()));
    add("hf_ffn_mismatch", mx, cfg("intermediate_size", 47.into()));
    add("hf_ffn_huge", mx, cfg("intermediate_size", u64::MAX.into()));
    add("hf_act_unknown", mx, cfg("hidden_act", "tanhh".into()));
    add("hf_model_type", mx, cfg("model_type", "llama".into()));
    add("v3_n_group_zero", v3, cfg("n_group", 0.into()));
    add("v3_n_group_not_dividing", v3, cfg("n_group", 3.into()));
    add("v3_topk_group_past", v3, cfg("topk_group", 99.into()));
    add("v3_scale_string", v3, cfg("routed_scaling_factor", "inf".into()));
    add("v3_scale_huge", v3, cfg("routed_scaling_factor", 1e300.into()));
    add("switch_capacity_zero", sw, cfg("expert_capacity", 0.into()));
    add("switch_capacity_huge", sw, cfg("expert_capacity", 1_000_000_000_000_000_000u64.into()));
    add("switch_d_model_zero", sw, cfg("d_model", 0.into()));
    // Non-finite values.
    add("nan_x", ds, poke("input/x", 7, f32::NAN));
    add("inf_x", mx, poke("input/x", 0, f32::INFINITY));
    add("nan_weight", ds, poke("param/deepspeed_moe.experts.deepspeed_experts.1.0.weight", 3, f32::NAN));
    add("inf_router", mx, poke("param/gate.weight", 2, f32::NEG_INFINITY));
    add("nan_bias", v3, poke("param/gate.e_score_correction_bias", 1, f32::NAN));
    add("nan_noise", gate, poke("noise/rts_uniform", 30, f32::NAN));
    add("nan_expected", ds, poke("expect/y", 0, f32::NAN));
    add("inf_expected_masked_gate", "01_ds_gate_top1_eval", poke("expect/gates", 31, f32::INFINITY));
    add("nan_expected_gradient", mx, poke("grad/input/x", 0, f32::NAN));
    // Shapes and dtypes.
    add(
        "x_flat",
        ds,
        tensors(|m| {
            let t = m.remove("input/x").unwrap();
            let n = t.numel();
            m.insert("input/x".into(), t.reshape(&[n]).unwrap());
        }),
    );
    add("x_scalar", ds, tensors(|m| drop(m.insert("input/x".into(), HostTensor::scalar(1.0)))));
    add(
        "x_four_dims",
        ds,
        tensors(|m| {
            let t = m.remove("input/x").unwrap();
            let mut s = t.shape().to_vec();
            s.insert(0, 1);
            m.insert("input/x".into(), t.reshape(&s).unwrap());
        }),
    );
    add("x_empty", mx, tensors(|m| drop(m.insert("input/x".into(), HostTensor::f32(&[0, 32], vec![]).unwrap()))));
    add(
        "x_int",
        mx,
        tensors(|m| {
            let t = m.remove("input/x").unwrap();
            let s = t.shape().to_vec();
            m.insert("input/x".into(), HostTensor::i32(&s, vec![1; t.numel()]).unwrap());
        }),
    );
    add("x_wider", mx, reshape("input/x", &[16, 33]));
    add("weight_reshaped", mx, reshape("param/experts.0.w1.weight", &[48, 33]));
    add("weight_dropped", mx, tensors(|m| drop(m.remove("param/experts.3.w2.weight"))));
    add(
        "weight_extra",
        mx,
        tensors(|m| drop(m.insert("param/experts.9.w1.weight".into(), HostTensor::zeros(&[48, 32]).unwrap()))),
    );
    add(
        "weight_int",
        ds,
        tensors(|m| {
            let k = "param/deepspeed_moe.gate.wg.weight";
            let t = m.remove(k).unwrap();
            let s = t.shape().to_vec();
            m.insert(k.into(), HostTensor::i32(&s, vec![0; t.numel()]).unwrap());
        }),
    );
    add("noise_wrong_shape", gate, reshape("noise/rts_uniform", &[3, 3]));
    add("expected_wrong_shape", ds, reshape("expect/y", &[5]));
    add(
        "expected_transposed",
        mx,
        tensors(|m| {
            let y = m.remove("expect/y").unwrap();
            let s: Vec<usize> = y.shape().iter().rev().copied().collect();
            m.insert("expect/y".into(), y.reshape(&s).unwrap());
        }),
    );
    add("stray_tensor", ds, tensors(|m| drop(m.insert("expect/z".into(), HostTensor::zeros(&[2]).unwrap()))));
    add(
        "indices_wrong_shape",
        gate,
        tensors(|m| drop(m.insert("expect/indices".into(), HostTensor::i32(&[1], vec![0]).unwrap()))),
    );
    // The tensor file.
    add("st_truncated", ds, Break::FileBytes(Box::new(|b| b[..b.len() / 3].to_vec())));
    add("st_garbage", ds, Break::FileBytes(Box::new(|_| vec![0x5a; 4096])));
    add("st_empty", ds, Break::FileBytes(Box::new(|_| Vec::new())));
    add(
        "st_header_huge",
        ds,
        Break::FileBytes(Box::new(|mut b| {
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        })),
    );
    add(
        "st_header_past_file",
        ds,
        Break::FileBytes(Box::new(|mut b| {
            let len = b.len() as u64;
            b[..8].copy_from_slice(&len.to_le_bytes());
            b
        })),
    );
    // A shape that claims far more data than the file holds, offsets past it, a dtype the
    // engine does not read.
    add("st_forged_shape", ds, forge_input("shape", json!([1_000_000_000u64, 1_000_000_000u64])));
    add("st_forged_offsets", ds, forge_input("data_offsets", json!([0, u64::MAX])));
    add("st_forged_dtype", ds, forge_input("dtype", "BOOL".into()));
    v
}

/// The input tensor's `field` in the safetensors header set to `value`.
fn forge_input(field: &'static str, value: Value) -> Break {
    Break::FileBytes(Box::new(move |b| {
        forge_header(b, |h| {
            let key = h.as_object().unwrap().keys().find(|k| k.starts_with("input")).unwrap().clone();
            h[&key][field] = value.clone();
        })
    }))
}

/// A safetensors file with its JSON header edited (the header length kept right).
fn forge_header(b: Vec<u8>, edit: impl Fn(&mut Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    edit(&mut header);
    let h = serde_json::to_vec(&header).unwrap();
    [(h.len() as u64).to_le_bytes().to_vec(), h, b[8 + n..].to_vec()].concat()
}

fn write_corpus() -> PathBuf {
    let root = tmp("broken_corpus");
    for (name, case, b) in corpus() {
        let dir = root.join(&name);
        copy_case(&golden().join(case), &dir);
        match b {
            Break::Meta(f) => {
                let mut m: Value =
                    serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
                f(&mut m);
                std::fs::write(dir.join("case.json"), serde_json::to_vec(&m).unwrap()).unwrap();
            }
            Break::Tensors(f) => {
                let ck = Checkpoint::load(&dir.join("tensors.safetensors")).unwrap();
                let mut map: Tensors = ck.iter().unwrap().map(|(k, v)| (k.into(), v.clone())).collect();
                f(&mut map);
                save_safetensors(&dir.join("tensors.safetensors"), &map).unwrap();
            }
            Break::MetaBytes(bytes) => std::fs::write(dir.join("case.json"), bytes).unwrap(),
            Break::FileBytes(f) => {
                let bytes = std::fs::read(dir.join("tensors.safetensors")).unwrap();
                std::fs::write(dir.join("tensors.safetensors"), f(bytes)).unwrap();
            }
        }
    }
    root
}

#[test]
fn every_broken_case_fails_cleanly_one_by_one() {
    let root = write_corpus();
    let names: Vec<String> = corpus().into_iter().map(|(n, _, _)| n).collect();
    assert!(names.len() >= 90, "the corpus has {} cases", names.len());
    let mut bad = Vec::new();
    for name in &names {
        let mut c = moe();
        c.arg("check").arg(root.join(name));
        let out = run(c, Duration::from_secs(60));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let ok = out.status.code() == Some(1) && stdout.contains("0 passed, 1 failed") && !stderr.contains("panicked");
        if !ok {
            bad.push(format!("{name}: {:?}\n{stdout}{stderr}", out.status));
        }
    }
    assert!(bad.is_empty(), "broken cases that did not fail cleanly:\n{}", bad.join("\n"));
}

#[test]
fn the_broken_corpus_as_one_folder_fails_every_case_on_cpu_and_wgpu() {
    let root = write_corpus();
    let n = corpus().len();
    for backend in ["cpu", "wgpu"] {
        if backend == "wgpu" && moe_wgpu::list_adapters().is_empty() {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true and no wgpu adapter");
            eprintln!("SKIP the_broken_corpus on wgpu: no adapter");
            continue;
        }
        let mut c = moe();
        c.args(["check", "--backend", backend]).arg(&root);
        let out = run(c, Duration::from_secs(300));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{backend}:\n{stdout}{stderr}");
        assert!(stdout.contains(&format!("0 passed, {n} failed")), "{backend}:\n{stdout}");
        assert!(!stderr.contains("panicked"), "{backend}:\n{stderr}");
    }
}

/// `moe bench machine` measures a read bandwidth and an FMA peak, both positive and
/// finite; `moe bench layer --profile` accounts for the forward op by op.
#[test]
fn the_floors_and_the_profile_are_measured_and_reported() {
    let (out, _) = moe_ok(&["bench", "machine", "--threads", "1", "--mib", "64", "--passes", "2", "--json"], &[], 0);
    let v: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    for key in ["best_gbps", "median_gbps", "fma_gflops"] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{key}: {out}");
    }
    // The bf16 pair-dot peak: measured where the cpu has AVX-512 BF16, null elsewhere.
    let dot = &v["bf16_dot_gflops"];
    assert!(dot.is_null() || dot.as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "bf16_dot_gflops: {out}");
    let tile = &v["bf16_tile_gflops"];
    assert!(tile.is_null() || tile.as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "bf16_tile_gflops: {out}");
    // Tiles come only with the pair dots (the tile kernels round and pack with them).
    assert!(tile.is_null() || !dot.is_null(), "tiles without pair dots: {out}");
    let small = ["--hidden", "64", "--ffn", "96", "--experts", "8", "--top-k", "2", "--tokens", "4", "--iters", "3"];
    let (out, _) = moe_ok(&[&["bench", "layer", "--threads", "1", "--profile"][..], &small].concat(), &[], 0);
    for op in ["route", "permute", "grouped_mlp", "combine", "(outside ops)"] {
        assert!(out.contains(op), "{op} missing from the profile:\n{out}");
    }
    let (out, _) =
        moe_ok(&[&["bench", "layer", "--threads", "1", "--dtype", "bf16", "--json"][..], &small].concat(), &[], 0);
    let v: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(v["dtype"], "bf16");
    let ops = v["ops"].as_array().unwrap();
    let share: f64 = ops.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!(ops.iter().any(|o| o["op"] == "grouped_mlp") && share > 0.0 && share <= 1.0 + 1e-9, "{out}");
}

/// `moe check --weights bf16` runs a case with half expert weights (and says when it
/// skips a training trace); with --ep it is refused, naming the flag.
#[test]
fn check_runs_cases_with_half_weights() {
    let case = golden().join("22_hf_mixtral");
    let trace = golden().join("t05_hf_mixtral_aux_adamw");
    let (out, _) = moe_ok(&["check", "--weights", "bf16", case.to_str().unwrap(), trace.to_str().unwrap()], &[], 0);
    assert!(out.contains("PASS 22_hf_mixtral") && out.contains("SKIP") && out.contains("1 passed, 0 failed"), "{out}");
    refused(&["check", "--weights", "f16", "--ep", "2", case.to_str().unwrap()], "--weights");
    refused(&["check", "--weights", "f64", case.to_str().unwrap()], "--weights");
}
