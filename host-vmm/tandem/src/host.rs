//! Engine and accelerator resolution, shared by `tandem run` and
//! `tandem host`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tandem_engine::{accel, Accel, AccelChoice, AccelFacts, AccelRequest, Engine};
use tandem_image::{Cache, ImageManifest};

/// How long a guest may take to reach init in the KVM boot probe. A real
/// KVM boots the image in about a second; a failing one rarely says so
/// quickly, so the limit bounds the cost of finding out.
const PROBE_LIMIT: Duration = Duration::from_secs(20);

#[derive(Args)]
pub struct HostArgs {
    /// Also run the boot probe under KVM and TCG now, whatever the facts
    /// say, and show both results.
    #[arg(long)]
    probe: bool,
    #[arg(long)]
    json: bool,
    /// Use this QEMU binary.
    #[arg(long)]
    engine: Option<PathBuf>,
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: AccelRequest,
}

pub fn find_engine(explicit: Option<&Path>, cache: &Cache) -> Result<Engine> {
    let path_env = std::env::var_os("PATH");
    Ok(Engine::find(
        explicit,
        cache.engine_binary().as_deref(),
        path_env.as_deref(),
    )?)
}

/// A remembered probe result: valid for one boot of the host and one engine.
#[derive(Serialize, Deserialize, PartialEq)]
struct ProbeRecord {
    boot_id: String,
    engine: PathBuf,
    engine_version: String,
    kernel: PathBuf,
    result: Result<u64, String>,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Chooses the accelerator, running (or recalling) the KVM boot probe when
/// it could change the answer and a guest image is there to boot.
pub async fn choose_accel(
    req: AccelRequest,
    engine: &Engine,
    image: Option<&ImageManifest>,
    cache: &Cache,
) -> Result<(AccelChoice, AccelFacts)> {
    let mut facts = accel::gather(Path::new("/sys/module"));
    if accel::wants_probe(req, &facts) {
        if let Some(img) = image {
            let record_path = cache.root().join("kvm-probe.json");
            let wanted = |r: &ProbeRecord| {
                r.boot_id == boot_id()
                    && r.engine == engine.path
                    && r.engine_version == engine.version.to_string()
                    && r.kernel == img.kernel
            };
            let remembered = std::fs::read(&record_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<ProbeRecord>(&b).ok())
                .filter(wanted);
            let result = match remembered {
                Some(r) => r.result,
                None => {
                    eprintln!("tandem: checking that KVM can boot a guest (once per host boot)...");
                    let r = tandem_vmm::probe::boot_probe(
                        engine,
                        &img.kernel,
                        &img.initrd,
                        Accel::Kvm,
                        PROBE_LIMIT,
                    )
                    .await
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    let rec = ProbeRecord {
                        boot_id: boot_id(),
                        engine: engine.path.clone(),
                        engine_version: engine.version.to_string(),
                        kernel: img.kernel.clone(),
                        result: r.clone(),
                    };
                    if let Ok(bytes) = serde_json::to_vec(&rec) {
                        let _ = std::fs::create_dir_all(cache.root());
                        let _ = std::fs::write(&record_path, bytes);
                    }
                    r
                }
            };
            facts.boot_probe = Some(result.map(|_| ()));
        }
    }
    let choice = accel::choose(req, &facts)?;
    Ok((choice, facts))
}

pub async fn host(args: HostArgs) -> Result<i32> {
    let cache = Cache::default_location();
    let engine = find_engine(args.engine.as_deref(), &cache)?;
    let image = cache.default_image();
    let (choice, facts) = choose_accel(args.accel, &engine, image.as_ref(), &cache).await?;
    let mut probes = Vec::new();
    if args.probe {
        let img = image
            .as_ref()
            .context("--probe boots the default image: run `tandem image build` first")?;
        for a in [Accel::Kvm, Accel::Tcg] {
            if a == Accel::Kvm && !Path::new("/dev/kvm").exists() {
                probes.push((a, Err("/dev/kvm does not exist".to_string())));
                continue;
            }
            let r =
                tandem_vmm::probe::boot_probe(&engine, &img.kernel, &img.initrd, a, PROBE_LIMIT)
                    .await;
            probes.push((
                a,
                r.map(|d| format!("init reached in {:.2}s", d.as_secs_f64())),
            ));
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "engine": engine,
                "facts": facts,
                "choice": choice,
                "probes": probes.iter().map(|(a, r)| serde_json::json!({"accel": a, "result": r})).collect::<Vec<_>>(),
            }))?
        );
    } else {
        println!(
            "engine:      QEMU {} [{}] {}",
            engine.version,
            engine.origin,
            engine.path.display()
        );
        println!(
            "/dev/kvm:    {:?}{}",
            facts.dev_kvm,
            if facts.pvm { " (kvm_pvm)" } else { "" }
        );
        println!("accelerator: {} ({})", choice.accel, choice.reason);
        for (a, r) in probes {
            match r {
                Ok(s) => println!("boot probe:  {a}: {s}"),
                Err(e) => println!("boot probe:  {a}: FAILED: {e}"),
            }
        }
    }
    Ok(0)
}
