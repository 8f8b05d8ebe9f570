//! The shipped descriptions against the config spaces of the devices they
//! describe: zero gaps, capabilities found wherever they sit.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use common::*;
use tandem_cfgpolicy::{
    mock::MockFunction, BindError, Description, Function, Policy, DESCRIPTIONS,
};

#[test]
fn every_builtin_description_parses() {
    assert_eq!(DESCRIPTIONS.len(), 3);
    for (name, text) in DESCRIPTIONS {
        let d = Description::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&d.name, name);
    }
}

#[test]
fn control_description_covers_the_real_control_device() {
    let g = Guarded::control();
    let caps: Vec<(&str, u16)> = g.policy.capabilities().collect();
    // tandem-pci puts the PCIe capability first (0x40, 60 bytes), then MSI-X.
    assert_eq!(caps, vec![("pcie", 0x40), ("msix", 0x7c)]);
    // Every byte of the header and both capabilities has a register.
    for at in (0..0x40).chain(0x40..0x88) {
        assert!(g.policy.register_at(at).is_some(), "byte {at:#x} uncovered");
    }
    assert!(g.policy.register_at(0x88).is_none());
    assert_eq!(
        g.policy.register_at(0x7e).unwrap().name,
        "msix.message-control"
    );
}

#[test]
fn nvme_descriptions_cover_the_tandem_pci_layout() {
    let pf = nvme_config(true);
    let p = Policy::bind(
        desc("nvme-pf"),
        pf.bytes(),
        fid(Function::Pf),
        nvme_bar_sizes(),
    )
    .unwrap();
    let caps: Vec<(&str, u16)> = p.capabilities().collect();
    assert_eq!(
        caps,
        vec![
            ("pm", 0x40),
            ("msix", 0x48),
            ("pcie", 0x54),
            ("sriov", 0x100)
        ]
    );
    assert_eq!(p.register_at(0x108).unwrap().name, "sriov.control");
    let vf = nvme_config(false);
    let p = Policy::bind(
        desc("nvme-vf"),
        vf.bytes(),
        fid(Function::Vf(1)),
        nvme_bar_sizes(),
    )
    .unwrap();
    assert_eq!(p.capabilities().count(), 3);
    assert!(
        p.register_at(0x108).is_none(),
        "a VF has no SR-IOV capability"
    );
}

#[test]
fn nvme_descriptions_cover_the_documented_layout() {
    // PM at 0x40, MSI-X at 0x50, PCIe at 0x60, SR-IOV at 0x100.
    let pf = MockFunction::nvme(true);
    let p = Policy::bind(
        desc("nvme-pf"),
        pf.config(),
        fid(Function::Pf),
        pf.bar_sizes(),
    )
    .unwrap();
    let caps: Vec<(&str, u16)> = p.capabilities().collect();
    assert_eq!(
        caps,
        vec![
            ("pm", 0x40),
            ("msix", 0x50),
            ("pcie", 0x60),
            ("sriov", 0x100)
        ]
    );
    for at in (0..0x48)
        .chain(0x50..0x5c)
        .chain(0x60..0x9c)
        .chain(0x100..0x140)
    {
        assert!(p.register_at(at).is_some(), "byte {at:#x} uncovered");
    }
    let vf = MockFunction::nvme(false);
    Policy::bind(
        desc("nvme-vf"),
        vf.config(),
        fid(Function::Vf(2)),
        vf.bar_sizes(),
    )
    .unwrap();
}

#[test]
fn a_description_is_refused_for_the_wrong_function() {
    let vf = nvme_config(false);
    let e = Policy::bind(
        desc("nvme-pf"),
        vf.bytes(),
        fid(Function::Vf(1)),
        nvme_bar_sizes(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, BindError::Missing { name, .. } if name == "sriov"),
        "{e}"
    );
    assert!(e.to_string().contains("`sriov`"), "{e}");

    let pf = nvme_config(true);
    let e = Policy::bind(
        desc("nvme-vf"),
        pf.bytes(),
        fid(Function::Pf),
        nvme_bar_sizes(),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "description `nvme-vf` does not describe the extended capability 0x10 found at 0x100 \
         (first uncovered byte: 0x100)"
    );

    let e = Policy::bind(
        desc("control"),
        pf.bytes(),
        fid(Function::Pf),
        nvme_bar_sizes(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            BindError::Undescribed {
                id: 0x01,
                offset: 0x40,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn broken_capability_placement_is_refused() {
    let id = || fid(Function::Single);
    // PCIe (60 bytes) at 0xf8 would run past the standard space.
    let mut img = control_config().bytes().to_vec();
    img[0x34] = 0xf8;
    img[0xf8] = 0x10;
    img[0xf9] = 0;
    let e = Policy::bind(desc("control"), &img, id(), control_bar_sizes()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "capability `pcie` at 0xf8 (60 bytes) runs past 0x100"
    );
    // MSI-X chained inside the PCIe capability.
    let mut img = control_config().bytes().to_vec();
    img[0x41] = 0x50;
    img[0x50] = 0x11;
    img[0x51] = 0;
    let e = Policy::bind(desc("control"), &img, id(), control_bar_sizes()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "capability `msix` at 0x50 overlaps capability `pcie` at config offset 0x50"
    );
    // A list that loops.
    let mut img = control_config().bytes().to_vec();
    img[0x7d] = 0x40;
    let e = Policy::bind(desc("control"), &img, id(), control_bar_sizes()).unwrap_err();
    assert!(e.to_string().contains("loops back to 0x40"), "{e}");
}
