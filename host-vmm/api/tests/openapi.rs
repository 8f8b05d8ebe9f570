//! The OpenAPI document and the code describe the same API.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use serde_json::Value;
use tandem_api::*;

fn spec() -> Value {
    let text = include_str!("../openapi.yaml");
    serde_yaml_ng::from_str(text).expect("openapi.yaml parses")
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let spec = spec();
    let paths = spec["paths"].as_object().unwrap();
    for (method, path) in routes::ALL {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is not in openapi.yaml"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        routes::ALL.len(),
        "openapi.yaml documents routes the code lacks"
    );
}

/// Each schema's required fields are exactly the fields the type always
/// serializes, and the type has no field the schema lacks.
fn check_schema(name: &str, example: &impl serde::Serialize) {
    let spec = spec();
    let schema = &spec["components"]["schemas"][name];
    let props = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{name} has no properties"));
    let value = serde_json::to_value(example).unwrap();
    for key in value.as_object().unwrap().keys() {
        assert!(props.contains_key(key), "{name}.{key} is not documented");
    }
    if let Some(required) = schema["required"].as_array() {
        for key in required {
            assert!(
                value.get(key.as_str().unwrap()).is_some(),
                "{name}.{key} is documented but missing"
            );
        }
    }
}

#[test]
fn schemas_match_types() {
    let engine = EngineInfo {
        path: "/q".into(),
        version: tandem_engine::EngineVersion {
            major: 10,
            minor: 2,
            micro: 2,
        },
        package: "p".into(),
        origin: "cache".into(),
        pid: Some(1),
    };
    let info = VmInfo {
        name: "vm0".into(),
        state: VmState::Running,
        accel: tandem_engine::Accel::Tcg,
        accel_reason: "r".into(),
        engine: engine.clone(),
        cpus: 1,
        memory_mib: 512,
        kernel: "/k".into(),
        initrd: None,
        append: "".into(),
        disks: vec![DiskInfo {
            id: "disk0".into(),
            path: "/d".into(),
            format: "raw".into(),
            interface: "vhost-blk".into(),
            readonly: false,
            volume_socket: Some("/s.devices/vhost-disk0.volume".into()),
        }],
        serial: "none".into(),
        api_socket: "/s".into(),
        uptime_ms: 1,
        tandem_version: "0.1.0".into(),
        abi_version: "1.0".into(),
    };
    check_schema("VmInfo", &info);
    check_schema("EngineInfo", &engine);
    check_schema("DiskInfo", &info.disks[0]);
    check_schema(
        "Ping",
        &Ping {
            tandem_version: "0".into(),
            abi_version: "1.0".into(),
            pid: 1,
        },
    );
    check_schema(
        "ShutdownRequest",
        &ShutdownRequest {
            timeout_s: Some(3),
            force: true,
        },
    );
    check_schema(
        "ShutdownResponse",
        &ShutdownResponse {
            graceful: true,
            elapsed_ms: 3,
        },
    );
    check_schema("ApiError", &ApiError { error: "e".into() });
    use tandem_api::channel::*;
    let info = ChannelInfo {
        device_error: Some("x".into()),
        version: Some("1.0".into()),
        ..Default::default()
    };
    check_schema("ChannelInfo", &info);
    check_schema("Counters", &Counters::default());
    let server = ServerStatus {
        pid: Some(1),
        session: 1,
        restarts: 0,
        state: "running".into(),
        last_exit: None,
        last_error: None,
    };
    check_schema("ServerStatus", &server);
    check_schema(
        "ChannelStatus",
        &ChannelStatus {
            server,
            device: Some(info),
        },
    );
    check_schema(
        "PingRequest",
        &PingRequest {
            count: 1,
            size: None,
            timeout_ms: 1,
            seed: 0,
        },
    );
    check_schema("PingReport", &PingReport::default());
    check_schema(
        "InjectRequest",
        &InjectRequest {
            fault: Fault::Garbage,
        },
    );
    // Enum spellings
    let states = spec()["components"]["schemas"]["VmInfo"]["properties"]["state"]["enum"].clone();
    for s in [
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::ShuttingDown,
        VmState::Stopped,
    ] {
        let v = serde_json::to_value(s).unwrap();
        assert!(
            states.as_array().unwrap().contains(&v),
            "{v} not in the state enum"
        );
    }
}
