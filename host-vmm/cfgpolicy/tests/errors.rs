//! Bad descriptions are refused at load with an error naming the register
//! (or, for a gap, the block and offset left uncovered).
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use tandem_cfgpolicy::{DescError, Description};

fn control() -> String {
    tandem_cfgpolicy::builtin("control").unwrap().to_owned()
}

/// Replaces `from` with `to` inside register `reg`'s block of `text`.
fn edit(text: &str, reg: &str, from: &str, to: &str) -> String {
    let anchor = format!("name = \"{reg}\"\n");
    let start = text
        .find(&anchor)
        .unwrap_or_else(|| panic!("no register {reg}"));
    let end = text[start..]
        .find("\n[[register]]")
        .map_or(text.len(), |e| start + e);
    let block = &text[start..end];
    assert!(block.contains(from), "`{from}` not in {reg}");
    format!(
        "{}{}{}",
        &text[..start],
        block.replacen(from, to, 1),
        &text[end..]
    )
}

fn refused(text: &str) -> String {
    match Description::parse(text) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_unchanged_description_is_accepted() {
    Description::parse(&control()).unwrap();
}

#[test]
fn overlapping_registers() {
    let t = control()
        + "\n[[register]]\nname = \"shadow-command\"\nat = \"header\"\noffset = 0x04\nwidth = 2\nclass = \"device-local\"\n";
    assert_eq!(
        refused(&t),
        "registers `command` and `shadow-command` overlap at header offset 0x4"
    );
    let t = edit(&control(), "reserved-36", "width = 2", "width = 4");
    assert!(
        matches!(Description::parse(&t), Err(DescError::Register { .. })),
        "0x36 + 4 is unaligned"
    );
    let t = edit(&control(), "reserved-35", "offset = 0x35", "offset = 0x36");
    assert_eq!(
        refused(&t),
        "registers `reserved-35` and `reserved-36` overlap at header offset 0x36"
    );
}

#[test]
fn a_bit_with_two_classes() {
    let t = edit(&control(), "command", "mask = 0x0400", "mask = 0x0404");
    assert_eq!(
        refused(&t),
        "register `command`, field `intx-disable`: bit 2 is given two classes"
    );
}

#[test]
fn unknown_names() {
    let t = edit(
        &control(),
        "pcie.device-control",
        "\"flr\"]",
        "\"flr-storm\"]",
    );
    let e = refused(&t);
    assert!(
        e.starts_with(
            "register `pcie.device-control`, field `initiate-flr`: unknown translation `flr-storm`"
        ),
        "{e}"
    );
    let t = edit(
        &control(),
        "command",
        "flag = \"frozen\"",
        "flag = \"freeze\"",
    );
    let e = refused(&t);
    assert!(
        e.starts_with(
            "register `command`, field `memory-space`: `ignore-if` unknown host flag `freeze`"
        ),
        "{e}"
    );
    let t = edit(
        &control(),
        "bist",
        "class = \"read-only\"",
        "class = \"read-mostly\"",
    );
    assert!(refused(&t).starts_with("register `bist`: unknown class `read-mostly`"));
    let t = edit(&control(), "bist", "at = \"header\"", "at = \"pm\"");
    assert_eq!(
        refused(&t),
        "register `bist`: `at = \"pm\"` names no declared capability"
    );
    // A misspelt key is a syntax error that shows the line.
    let t = edit(&control(), "bist", "class = ", "clas = ");
    let e = refused(&t);
    assert!(e.contains("clas"), "{e}");
}

#[test]
fn bad_widths_and_offsets() {
    let t = edit(&control(), "reserved-38", "width = 4", "width = 3");
    assert_eq!(
        refused(&t),
        "register `reserved-38`: width 3 is not 1, 2 or 4"
    );
    let t = edit(
        &control(),
        "pcie.slot-status-2",
        "offset = 0x3a",
        "offset = 0x3c",
    );
    assert_eq!(
        refused(&t),
        "register `pcie.slot-status-2`: offset 0x3c + width 2 is outside capability `pcie` (60 bytes)"
    );
    let t = edit(&control(), "max-lat", "offset = 0x3f", "offset = 0x40");
    assert!(
        refused(&t).starts_with("register `max-lat`: offset 0x40 + width 1 is outside the header")
    );
    let t = edit(&control(), "interrupt-pin", "width = 1", "width = 2");
    assert_eq!(
        refused(&t),
        "register `interrupt-pin`: offset 0x3d is not aligned to its width 2"
    );
}

#[test]
fn gaps() {
    let t = edit(
        &control(),
        "max-lat",
        "offset = 0x3f\nwidth = 1",
        "offset = 0x3e\nwidth = 1",
    );
    assert_eq!(
        refused(&t),
        "registers `min-gnt` and `max-lat` overlap at header offset 0x3e"
    );
    let t = control().replace(
        "[[register]]\nname = \"max-lat\"\nat = \"header\"\noffset = 0x3f\nwidth = 1\nclass = \"read-only\"\n",
        "",
    );
    assert_eq!(
        refused(&t),
        "header offset 0x3f is not described by any register"
    );
    let t = control().replace(
        "[[register]]\nname = \"msix.pba\"\nat = \"msix\"\noffset = 0x08\nwidth = 4\nclass = \"read-only\"\naudit = true\n",
        "",
    );
    assert_eq!(
        refused(&t),
        "capability `msix` offset 0x8 is not described by any register"
    );
    // Bits of a register nobody classed.
    let t = edit(&control(), "status", "class = \"read-only\"\n", "");
    assert_eq!(
        refused(&t),
        "register `status`: bits 0x6ff have no class (add a field or a register-level `class`)"
    );
}

#[test]
fn contradictions_in_rules() {
    let t = edit(
        &control(),
        "bist",
        "class = \"read-only\"",
        "class = \"read-only\"\nwrite = \"deny\"",
    );
    assert!(refused(&t).starts_with("register `bist`: is `read-only` but has a write rule"));
    let t = edit(
        &control(),
        "command",
        "write = \"translate\"\ntranslation = \"ignore-if\"",
        "write = \"permit\"\ntranslation = \"ignore-if\"",
    );
    assert!(refused(&t).starts_with(
        "register `command`, field `bus-master`: `write = \"permit\"` with a `translation`"
    ));
    let t = edit(
        &control(),
        "command",
        "write = \"translate\"\ntranslation = \"ignore-if\"\n",
        "",
    );
    assert!(refused(&t)
        .starts_with("register `command`, field `bus-master`: is system-wide but has no `write`"));
    let t = edit(
        &control(),
        "pcie.device-control",
        "per-second = 4",
        "per-second = 0",
    );
    assert!(refused(&t).contains("`flr` needs `per-second`"));
    let t = edit(
        &control(),
        "msix.message-control",
        "write = \"permit\"",
        "write = \"permit\"\nflag = \"frozen\"",
    );
    assert!(refused(&t).starts_with("register `msix.message-control`, field `enable`: parameter `flag` is given but no translation uses it"));
    let t = edit(&control(), "status", "w1c = true", "w1c = true\nmax = 3");
    assert!(refused(&t).contains("parameter `max`"));
    let t = edit(
        &control(),
        "cache-line-size",
        "class = \"device-local\"",
        "class = \"read-only\"\nw1c = true",
    );
    assert!(
        refused(&t).starts_with("register `cache-line-size`: is read-only and write-one-to-clear")
    );
    let t = edit(
        &control(),
        "bar0",
        "translation = \"bar-check\"",
        "translation = \"bar-check\"\n# moved",
    );
    Description::parse(&t).unwrap();
    let t = edit(
        &control(),
        "interrupt-line",
        "class = \"device-local\"",
        "class = \"system-wide\"\nwrite = \"translate\"\ntranslation = \"bar-check\"",
    );
    assert!(refused(&t).contains("`bar-check` applies to the header's BAR registers"));
}

#[test]
fn capability_declarations() {
    let t = control().replace(
        "name = \"msix\"\nkind = \"standard\"\nid = 0x11\nsize = 12",
        "name = \"msix\"\nkind = \"standard\"\nid = 0x11\nsize = 1",
    );
    assert!(refused(&t).starts_with("capability `msix`: size 1 is outside 2..=192"));
    let t = control().replace(
        "name = \"msix\"\nkind = \"standard\"\nid = 0x11",
        "name = \"msix\"\nkind = \"standard\"\nid = 0x10",
    );
    assert_eq!(
        refused(&t),
        "capability `msix`: standard capability id 0x10 is declared twice"
    );
}
