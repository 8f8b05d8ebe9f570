//! The control API server: REST/JSON on the VM's Unix socket.
//!
//! Routes and bodies are defined in `tandem-api`; this module only maps
//! them onto [`Vm`] operations and lifecycle errors onto HTTP statuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use tandem_api::channel::{ChannelStatus, InjectRequest, PingReport, PingRequest};
use tandem_api::{routes, ApiError, Ping, ShutdownRequest, ShutdownResponse, VmState};
use tandem_control_device::api::{Request as DevRequest, Response as DevResponse};
use tracing::info;

use crate::lifecycle::Command;
use crate::vm::{Vm, VmError};

/// Default grace period for a guest to obey the power button.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

struct Error(StatusCode, String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl Error {
    /// `e` with its causes, under `status`.
    fn from_error(status: StatusCode, e: &dyn std::error::Error) -> Error {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Error(status, msg)
    }
}

impl From<VmError> for Error {
    fn from(e: VmError) -> Error {
        let status = match &e {
            VmError::Lifecycle(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Error(status, msg)
    }
}

pub fn router(vm: Arc<Vm>) -> Router {
    Router::new()
        .route(routes::PING, get(ping))
        .route(routes::VM_INFO, get(info))
        .route(routes::VM_PAUSE, put(pause))
        .route(routes::VM_RESUME, put(resume))
        .route(routes::VM_SHUTDOWN, put(shutdown))
        .route(routes::VM_SNAPSHOT, put(snapshot))
        .route(routes::VM_MIGRATE, put(migrate))
        .route(routes::CHANNEL_INFO, get(channel_info))
        .route(routes::CHANNEL_PING, put(channel_ping))
        .route(routes::CHANNEL_INJECT, put(channel_inject))
        .route(routes::DEVICE_LIST, get(device_list))
        .route(routes::DEVICE_ATTACH, put(device_attach))
        .route(routes::DEVICE_DETACH, put(device_detach))
        .route(routes::DEVICE_GUEST, put(device_guest))
        .fallback(|| async {
            Error(
                StatusCode::NOT_FOUND,
                "no such route (see openapi.yaml)".into(),
            )
        })
        .with_state(vm)
}

async fn ping() -> Json<Ping> {
    Json(Ping {
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        abi_version: shared_abi::ABI_VERSION.to_string(),
        pid: std::process::id(),
    })
}

async fn info(State(vm): State<Arc<Vm>>) -> Json<tandem_api::VmInfo> {
    Json(vm.info())
}

async fn pause(State(vm): State<Arc<Vm>>) -> Result<Json<tandem_api::VmInfo>, Error> {
    vm.command(Command::Pause).await?;
    info!("paused by the API");
    Ok(Json(vm.info()))
}

async fn resume(State(vm): State<Arc<Vm>>) -> Result<Json<tandem_api::VmInfo>, Error> {
    vm.command(Command::Resume).await?;
    info!("resumed by the API");
    Ok(Json(vm.info()))
}

async fn shutdown(State(vm): State<Arc<Vm>>, body: Bytes) -> Result<Json<ShutdownResponse>, Error> {
    let req: ShutdownRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ShutdownRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Error(
                StatusCode::BAD_REQUEST,
                format!("bad shutdown request: {e}"),
            )
        })?
    };
    let timeout = req
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
    let begun = Instant::now();
    let mut state = vm.watch_state();
    vm.command(Command::Shutdown {
        force: req.force,
        timeout,
    })
    .await?;
    info!(force = req.force, ?timeout, "shutdown requested by the API");
    // The lifecycle forces the VM off when the timeout runs out, so this
    // wait is bounded; the extra margin covers QEMU's own exit.
    let waited = tokio::time::timeout(
        timeout + Duration::from_secs(30),
        state.wait_for(|s| *s == VmState::Stopped),
    )
    .await;
    if waited.is_err() {
        return Err(Error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "QEMU did not exit after quit".into(),
        ));
    }
    Ok(Json(ShutdownResponse {
        graceful: vm.graceful(),
        elapsed_ms: u64::try_from(begun.elapsed().as_millis()).unwrap_or(u64::MAX),
    }))
}

fn control(vm: &Vm) -> Result<&Arc<crate::control::ControlServer>, Error> {
    vm.control().ok_or_else(|| {
        Error(
            StatusCode::NOT_FOUND,
            "this VM has no control device".into(),
        )
    })
}

async fn channel_info(State(vm): State<Arc<Vm>>) -> Result<Json<ChannelStatus>, Error> {
    let c = control(&vm)?;
    let device = match c.request(&DevRequest::Info, Duration::from_secs(5)).await {
        Ok(DevResponse::Info(i)) => Some(*i),
        _ => None,
    };
    Ok(Json(ChannelStatus {
        server: c.status(),
        device,
    }))
}

/// Most pings one request may ask for.
const MAX_PINGS: u32 = 100_000;

async fn channel_ping(State(vm): State<Arc<Vm>>, body: Bytes) -> Result<Json<PingReport>, Error> {
    let c = control(&vm)?;
    let req: PingRequest = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_str("{}")
            .map_err(|e| Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error(StatusCode::BAD_REQUEST, format!("bad ping request: {e}")))?
    };
    if req.count == 0 || req.count > MAX_PINGS {
        return Err(Error(
            StatusCode::BAD_REQUEST,
            format!("count must be 1 to {MAX_PINGS}"),
        ));
    }
    let budget = Duration::from_millis(u64::from(req.count) * (u64::from(req.timeout_ms) + 1000))
        + Duration::from_secs(10);
    let r = c
        .request(
            &DevRequest::Ping {
                count: req.count,
                size: req.size,
                timeout_ms: req.timeout_ms,
                seed: req.seed,
            },
            budget,
        )
        .await
        .map_err(|e| {
            Error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e} (it may be restarting)"),
            )
        })?;
    match r {
        DevResponse::Ping(p) => Ok(Json(p)),
        DevResponse::Error { message } => Err(Error(StatusCode::BAD_REQUEST, message)),
        DevResponse::Info(_) | DevResponse::Injected | DevResponse::Function(_) => Err(Error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected answer".into(),
        )),
    }
}

async fn channel_inject(
    State(vm): State<Arc<Vm>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, Error> {
    let c = control(&vm)?;
    let req: InjectRequest = serde_json::from_slice(&body)
        .map_err(|e| Error(StatusCode::BAD_REQUEST, format!("bad inject request: {e}")))?;
    match c
        .request(
            &DevRequest::Inject { fault: req.fault },
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| {
            Error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e} (it may be restarting)"),
            )
        })? {
        DevResponse::Injected => Ok(Json(serde_json::json!({"injected": req.fault}))),
        DevResponse::Error { message } => Err(Error(StatusCode::CONFLICT, message)),
        _ => Err(Error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected answer".into(),
        )),
    }
}

fn device_error(e: crate::devices::DeviceError) -> Error {
    use crate::devices::DeviceError as D;
    let status = match &e {
        D::BadId(_) | D::Duplicate(_) | D::NoSocket(_) => StatusCode::BAD_REQUEST,
        D::NoPort(_) => StatusCode::CONFLICT,
        D::NotFound(_) => StatusCode::NOT_FOUND,
        D::Qemu(_) | D::Lender { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        D::Timeout { .. } | D::GuestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        D::NotInGuest(_) | D::Guest(_) => StatusCode::CONFLICT,
    };
    Error(status, e.to_string())
}

fn body<T: serde::de::DeserializeOwned>(b: &Bytes) -> Result<T, Error> {
    serde_json::from_slice(b)
        .map_err(|e| Error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

async fn device_list(State(vm): State<Arc<Vm>>) -> Json<tandem_api::DeviceList> {
    Json(crate::devices::list(&vm).await)
}

async fn device_attach(
    State(vm): State<Arc<Vm>>,
    b: Bytes,
) -> Result<Json<tandem_api::AttachedDevice>, Error> {
    if !matches!(vm.state(), VmState::Running | VmState::Paused) {
        return Err(Error(
            StatusCode::CONFLICT,
            format!("the VM is {}", vm.state()),
        ));
    }
    let req: tandem_api::DeviceAttachRequest = body(&b)?;
    crate::devices::attach(&vm, req)
        .await
        .map(Json)
        .map_err(device_error)
}

async fn device_detach(
    State(vm): State<Arc<Vm>>,
    b: Bytes,
) -> Result<Json<serde_json::Value>, Error> {
    let req: tandem_api::DeviceDetachRequest = body(&b)?;
    let timeout = req
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(crate::devices::DEFAULT_DETACH_TIMEOUT);
    crate::devices::detach(&vm, &req.id, timeout)
        .await
        .map_err(device_error)?;
    Ok(Json(serde_json::json!({})))
}

async fn device_guest(
    State(vm): State<Arc<Vm>>,
    b: Bytes,
) -> Result<Json<tandem_api::DeviceGuestResponse>, Error> {
    let req: tandem_api::DeviceGuestRequest = body(&b)?;
    let c = control(&vm)?.clone();
    crate::devices::guest_op(&vm, &c, req)
        .await
        .map(Json)
        .map_err(device_error)
}

fn leave_error(e: crate::snapshot::SnapshotError) -> Error {
    use crate::snapshot::SnapshotError as S;
    let status = match &e {
        S::State(_)
        | S::Assigned(_)
        | S::VhostBlk(..)
        | S::Shared
        | S::Exists(_)
        | S::Handoff(_) => StatusCode::CONFLICT,
        S::Relative(_) | S::Uri(_) | S::Downtime(_) => StatusCode::BAD_REQUEST,
        S::Write { .. } | S::Control(_) | S::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Error::from_error(status, &e)
}

async fn migrate(
    State(vm): State<Arc<Vm>>,
    b: Bytes,
) -> Result<Json<tandem_api::MigrateResponse>, Error> {
    let req: tandem_api::MigrateRequest = body(&b)?;
    let opts = handoff_options(req.handoff_timeout_ms, req.force_handoff);
    let limits = crate::snapshot::Limits {
        max_bandwidth_mib: req.max_bandwidth_mib,
        max_downtime_ms: req.max_downtime_ms,
    };
    let r = crate::snapshot::migrate(&vm, &req.to, limits, opts)
        .await
        .map_err(leave_error)?;
    Ok(Json(tandem_api::MigrateResponse {
        to: r.to,
        bytes: r.bytes,
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        downtime_us: r.downtime_us,
        handoff: r.handoff,
    }))
}

fn handoff_options(timeout_ms: Option<u32>, force: bool) -> crate::handoff::HandoffOptions {
    let d = crate::handoff::HandoffOptions::default();
    crate::handoff::HandoffOptions {
        timeout_ms: timeout_ms.unwrap_or(d.timeout_ms),
        force,
    }
}

async fn snapshot(
    State(vm): State<Arc<Vm>>,
    b: Bytes,
) -> Result<Json<tandem_api::SnapshotResponse>, Error> {
    let req: tandem_api::SnapshotRequest = body(&b)?;
    let opts = handoff_options(req.handoff_timeout_ms, req.force_handoff);
    let r = crate::snapshot::save(&vm, std::path::Path::new(&req.file), opts)
        .await
        .map_err(leave_error)?;
    Ok(Json(tandem_api::SnapshotResponse {
        file: r.file.display().to_string(),
        config: r.config.display().to_string(),
        bytes: r.bytes,
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        downtime_us: r.downtime_us,
        handoff: r.handoff,
    }))
}
