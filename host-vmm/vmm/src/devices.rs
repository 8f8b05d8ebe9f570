//! Functions assigned to a running VM: hot-plug into a free root port,
//! hot-remove, and the host proxy view (what the function's device server
//! reports about what the guest driver did with it).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_api::channel::FunctionOp;
use tandem_api::{AttachedDevice, DeviceAttachRequest, DeviceList};
use tandem_engine::cmdline::root_port_id;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{info, warn};

use crate::control::CONTROL_ID;
use crate::vm::{Vm, ROOT_PORTS};

/// How long a device server gets to answer a state query.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time the guest gets to release a function on detach.
pub const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device id {0:?} is not usable: ids are 1-64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("a device with id {0:?} is already attached")]
    Duplicate(String),
    #[error("socket {0} does not exist (is the device server running, and the VF enabled?)")]
    NoSocket(String),
    #[error("no free hot-plug root port (the VM has {0})")]
    NoPort(u32),
    #[error("no device with id {0:?} is attached")]
    NotFound(String),
    #[error("QEMU refused: {0}")]
    Qemu(String),
    #[error("the guest did not release {id} within {after:?}")]
    Timeout { id: String, after: Duration },
    #[error("{0} has no address in the guest yet (not enumerated; is the VM booted?)")]
    NotInGuest(String),
    #[error("the guest driver: {0}")]
    Guest(String),
    #[error("the guest driver did not answer: {0}")]
    GuestTimeout(String),
    #[error("the backend lending the function's volume ({api}) refused to let it in: {message}")]
    Lender { api: String, message: String },
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && id != CONTROL_ID
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_ports(vm: &Vm) -> Vec<String> {
    let used: Vec<String> = lock(&vm.assigned)
        .values()
        .map(|d| d.port.clone())
        .collect();
    // Port 0 carries the control device.
    (1..ROOT_PORTS)
        .map(root_port_id)
        .filter(|p| !used.contains(p))
        .collect()
}

pub async fn attach(vm: &Arc<Vm>, req: DeviceAttachRequest) -> Result<AttachedDevice, DeviceError> {
    if !valid_id(&req.id) {
        return Err(DeviceError::BadId(req.id));
    }
    if !Path::new(&req.socket).exists() {
        return Err(DeviceError::NoSocket(req.socket));
    }
    let port = {
        let assigned = lock(&vm.assigned);
        if assigned.contains_key(&req.id) {
            return Err(DeviceError::Duplicate(req.id));
        }
        drop(assigned);
        free_ports(vm)
            .into_iter()
            .next()
            .ok_or(DeviceError::NoPort(ROOT_PORTS))?
    };
    let dev = AttachedDevice {
        id: req.id.clone(),
        socket: req.socket.clone(),
        port: port.clone(),
        server_api: req.server_api.clone(),
        vf: req.vf,
        attached_at_ms: vm.uptime_ms(),
        state: None,
        state_error: None,
    };
    // A namespace on one of this VM's disks (its volume socket): the
    // disk's backend may still be fenced from an earlier function.
    let lenders = match &req.server_api {
        Some(api) => lenders_of(vm, api, req.vf).await,
        None => Vec::new(),
    };
    for l in &lenders {
        lender_call(l, json!({"op": "unfence"}), SERVER_TIMEOUT)
            .await
            .map_err(|message| DeviceError::Lender {
                api: l.display().to_string(),
                message,
            })?;
    }
    // Reserve the port before the (slow) device_add.
    lock(&vm.assigned).insert(req.id.clone(), dev.clone());
    let args = json!({
        "driver": "vfio-user-pci",
        "id": req.id,
        "bus": port,
        "socket": {"type": "unix", "path": req.socket},
    });
    if let Err(e) = vm.qmp().execute("device_add", Some(args)).await {
        lock(&vm.assigned).remove(&req.id);
        return Err(DeviceError::Qemu(e.to_string()));
    }
    info!(id = %req.id, port = %port, socket = %req.socket, lenders = lenders.len(), "function attached");
    if !lenders.is_empty() {
        lock(&vm.lenders).insert(req.id.clone(), lenders);
    }
    if let Some(api) = req.server_api.clone() {
        tokio::spawn(watch_server(vm.clone(), req.id.clone(), api));
    }
    Ok(dev)
}

/// How often an attached function's device server is checked.
const WATCH_PERIOD: Duration = Duration::from_millis(250);

/// Watches the device server of an attached function. When it dies, the
/// function has fallen off the bus: it is removed from the VM at once, so
/// the guest's driver fails its outstanding I/O (a surprise removal)
/// instead of waiting for its own command timeout.
async fn watch_server(vm: Arc<Vm>, id: String, api: String) {
    let mut misses = 0;
    loop {
        tokio::time::sleep(WATCH_PERIOD).await;
        let still = lock(&vm.assigned).get(&id).map(|d| d.server_api.clone());
        if still != Some(Some(api.clone())) {
            return;
        }
        match UnixStream::connect(&api).await {
            Ok(_) => misses = 0,
            Err(e) => {
                misses += 1;
                if misses < 2 {
                    continue;
                }
                warn!(id, api, error = %e, "the function's device server is gone: surprise removal");
                if let Err(e) = detach(&vm, &id, SURPRISE_TIMEOUT).await {
                    warn!(id, error = %e, "surprise removal did not complete");
                    lock(&vm.assigned).remove(&id);
                }
                return;
            }
        }
    }
}

/// The guest gets this long to let go of a function whose server died.
const SURPRISE_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn detach(vm: &Arc<Vm>, id: &str, timeout: Duration) -> Result<(), DeviceError> {
    if !lock(&vm.assigned).contains_key(id) {
        return Err(DeviceError::NotFound(id.into()));
    }
    fence_lenders(vm, id).await;
    let mut events = vm.qmp().subscribe();
    match vm
        .qmp()
        .execute("device_del", Some(json!({"id": id})))
        .await
    {
        Ok(_) => {}
        Err(e) if e.to_string().contains("not found") => {
            lock(&vm.assigned).remove(id);
            lock(&vm.lenders).remove(id);
            return Ok(());
        }
        Err(e) => return Err(DeviceError::Qemu(e.to_string())),
    }
    let gone = tokio::time::timeout(timeout, async {
        while let Ok(ev) = events.recv().await {
            if ev.name == "DEVICE_DELETED"
                && ev.data.get("device").and_then(Value::as_str) == Some(id)
            {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(gone, Ok(true)) {
        return Err(DeviceError::Timeout {
            id: id.into(),
            after: timeout,
        });
    }
    lock(&vm.assigned).remove(id);
    lock(&vm.direct_paths).remove(id);
    lock(&vm.lenders).remove(id);
    info!(id, "function detached");
    Ok(())
}

/// Asks a device server (JSON lines) for its state.
pub async fn server_info(api: &str) -> Result<Value, String> {
    ask(Path::new(api), &json!({"op": "info"}), SERVER_TIMEOUT).await
}

/// One request and its answer over a JSON-lines API socket.
async fn ask(api: &Path, req: &Value, within: Duration) -> Result<Value, String> {
    let shown = api.display();
    let q = async {
        let mut s = UnixStream::connect(api)
            .await
            .map_err(|e| format!("connect {shown}: {e}"))?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<Value>(&line).map_err(|e| format!("bad answer from {shown}: {e}"))
    };
    tokio::time::timeout(within, q)
        .await
        .map_err(|_| format!("{shown} did not answer within {within:?}"))?
}

/// A request to a disk backend's API; its `error` answer is an error.
async fn lender_call(api: &Path, req: Value, within: Duration) -> Result<Value, String> {
    let v = ask(api, &req, within).await?;
    match v.get("result").and_then(Value::as_str) {
        Some("error") => Err(v
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_string()),
        _ => Ok(v),
    }
}

/// A function's entry in its device server's state (`pf`, or its VF).
fn function_state(server: &Value, vf: u16) -> Option<&Value> {
    if vf == 0 {
        server.get("pf")
    } else {
        server
            .get("vfs")?
            .as_array()?
            .iter()
            .find(|x| x.get("vf").and_then(Value::as_u64) == Some(u64::from(vf)))
    }
}

/// The backends of this VM's disks that a function's namespaces borrow
/// through their volume sockets (`volume:PATH` in the server's state).
async fn lenders_of(vm: &Vm, api: &str, vf: u16) -> Vec<std::path::PathBuf> {
    let server = match server_info(api).await {
        Ok(v) => v,
        Err(e) => {
            warn!(api, error = %e, "cannot ask the device server which volumes its function uses; it will not be fenced");
            return Vec::new();
        }
    };
    // The PF's entry is the function; a VF's carries it in `function`.
    let Some(namespaces) = function_state(&server, vf)
        .and_then(|f| f.get("function").unwrap_or(f).get("namespaces"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    namespaces
        .iter()
        .filter_map(|n| n.as_str()?.strip_prefix("volume:"))
        .filter_map(|p| vm.lender_api(Path::new(p)))
        .collect()
}

/// How long a disk backend gets to finish the lent requests already
/// running when it is fenced.
const FENCE_WAIT_MS: u32 = 10_000;

/// Before a function leaves (asked, or because its server died), the
/// backends lending it a volume cut it off and finish what it already
/// sent them. Only then can the guest see the function gone and re-issue
/// its requests on the synthetic path: a write the function sent can no
/// longer land after the guest's re-issue (or after newer data). A
/// backend that cannot be fenced is logged; the removal goes on, since a
/// dead function must not stay in the guest.
async fn fence_lenders(vm: &Vm, id: &str) {
    let lenders = lock(&vm.lenders).get(id).cloned().unwrap_or_default();
    for l in lenders {
        let within = Duration::from_millis(u64::from(FENCE_WAIT_MS)) + SERVER_TIMEOUT;
        match lender_call(&l, json!({"op": "fence", "wait_ms": FENCE_WAIT_MS}), within).await {
            Ok(v) => {
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                let (closed, waited_us) = (n("closed"), n("waited_us"));
                info!(id, lender = %l.display(), closed, waited_us, "the function's volume is fenced");
            }
            Err(e) => {
                warn!(id, lender = %l.display(), error = %e, "cannot fence the function's volume; removing it anyway")
            }
        }
    }
}

pub async fn list(vm: &Arc<Vm>) -> DeviceList {
    let mut devices: Vec<AttachedDevice> = lock(&vm.assigned).values().cloned().collect();
    for d in &mut devices {
        let Some(api) = &d.server_api else { continue };
        match server_info(api).await {
            Ok(v) => {
                let f = function_state(&v, d.vf).cloned();
                match f {
                    Some(f) => d.state = Some(f),
                    None => d.state_error = Some(format!("the server no longer has VF {}", d.vf)),
                }
            }
            Err(e) => d.state_error = Some(e),
        }
    }
    DeviceList {
        devices,
        free_ports: free_ports(vm),
    }
}

/// Finds a device's PCI address as the guest enumerated it, from QEMU's
/// `query-pci` (devices behind root ports are nested under their bridge).
fn find_in_pci(buses: &Value, id: &str) -> Option<(u8, u8)> {
    fn walk(devices: &Value, id: &str) -> Option<(u8, u8)> {
        for d in devices.as_array()? {
            if d.get("qdev_id").and_then(Value::as_str) == Some(id) {
                let bus = u8::try_from(d.get("bus")?.as_u64()?).ok()?;
                let slot = d.get("slot")?.as_u64()?;
                let func = d.get("function")?.as_u64()?;
                let devfn = u8::try_from((slot << 3) | func).ok()?;
                return Some((bus, devfn));
            }
            if let Some(found) = d
                .get("pci_bridge")
                .and_then(|b| b.get("devices"))
                .and_then(|ds| walk(ds, id))
            {
                return Some(found);
            }
        }
        None
    }
    buses
        .as_array()?
        .iter()
        .find_map(|b| b.get("devices").and_then(|ds| walk(ds, id)))
}

/// Default time the guest gets to drain a function on `quiesce`.
const DEFAULT_DRAIN_MS: u32 = 5000;

/// Carries a `device.guest` operation to the guest driver over the control
/// channel and returns its answer.
pub async fn guest_op(
    vm: &Arc<Vm>,
    control: &Arc<crate::control::ControlServer>,
    req: tandem_api::DeviceGuestRequest,
) -> Result<tandem_api::DeviceGuestResponse, DeviceError> {
    use tandem_control_device::api::{Request as DevRequest, Response as DevResponse};
    let assigned = lock(&vm.assigned).contains_key(&req.id);
    // Path operations also name the VM's own disks (the synthetic path is
    // a virtio-blk disk, `disk<N>`); the others only assigned functions.
    if !assigned && (!req.op.is_path_op() || !req.id.starts_with("disk")) {
        return Err(DeviceError::NotFound(req.id));
    }
    let pci = vm
        .qmp()
        .execute("query-pci", None)
        .await
        .map_err(|e| DeviceError::Qemu(e.to_string()))?;
    let (bus, devfn) =
        find_in_pci(&pci, &req.id).ok_or_else(|| DeviceError::NotInGuest(req.id.clone()))?;
    if bus == 0 && assigned {
        // A root port the guest has not given a bus number yet.
        return Err(DeviceError::NotInGuest(req.id));
    }
    let drain_ms = req.drain_ms.unwrap_or(DEFAULT_DRAIN_MS);
    // A path operation's drain is the operator's handoff budget: little
    // slack beyond it. Other operations keep a generous margin.
    let (margin, slack) = if req.op.is_path_op() {
        (1000, 500)
    } else {
        (5000, 3000)
    };
    let timeout_ms = drain_ms.saturating_add(margin);
    let call = tandem_api::channel::FunctionCall {
        op: req.op,
        segment: 0,
        bus,
        devfn,
        drain_ms,
        lease_ms: req.lease_ms.unwrap_or(0),
        frozen: req.frozen,
        volume: req.volume.unwrap_or(0),
        timeout_ms,
    };
    let answer = control
        .request(
            &DevRequest::Function { call },
            Duration::from_millis(u64::from(timeout_ms) + slack),
        )
        .await
        .map_err(|e| DeviceError::GuestTimeout(e.to_string()))?;
    let guest = match answer {
        DevResponse::Function(g) => g,
        DevResponse::Error { message } => return Err(DeviceError::Guest(message)),
        _ => {
            return Err(DeviceError::Guest(
                "unexpected answer from the control device".into(),
            ))
        }
    };
    info!(id = %req.id, op = ?req.op, status = %guest.status, in_flight = guest.in_flight, quiesced = guest.quiesced, "guest function operation");
    if assigned && guest.status_code == Some(shared_abi::msg::Status::Ok as u16) {
        let mut paths = lock(&vm.direct_paths);
        match req.op {
            FunctionOp::PathDirect => {
                paths.insert(req.id.clone(), req.volume.unwrap_or(0));
            }
            FunctionOp::PathRelease => {
                paths.remove(&req.id);
            }
            _ => {}
        }
    }
    Ok(tandem_api::DeviceGuestResponse {
        id: req.id,
        guest_address: format!("0000:{bus:02x}:{:02x}.{}", devfn >> 3, devfn & 7),
        guest,
    })
}

#[cfg(test)]
mod tests {
    use super::{find_in_pci, valid_id};

    #[test]
    fn finds_devices_behind_root_ports() {
        let pci = serde_json::json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 1, "function": 0, "qdev_id": "", "class_info": {}},
            {"bus": 0, "slot": 2, "function": 0, "qdev_id": "rp1",
             "pci_bridge": {"bus": {"number": 3}, "devices": [
                {"bus": 3, "slot": 0, "function": 0, "qdev_id": "nvme-vf1"}]}},
        ]}]);
        assert_eq!(find_in_pci(&pci, "nvme-vf1"), Some((3, 0)));
        assert_eq!(find_in_pci(&pci, "rp1"), Some((0, 16)));
        assert_eq!(find_in_pci(&pci, "nope"), None);
        assert_eq!(find_in_pci(&serde_json::json!({}), "x"), None);
    }

    #[test]
    fn ids() {
        assert!(valid_id("nvme-vf1"));
        assert!(!valid_id(""));
        assert!(!valid_id("a,b"));
        assert!(!valid_id("tandem-ctl"));
        assert!(!valid_id(&"x".repeat(65)));
    }
}
