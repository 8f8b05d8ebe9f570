//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the commands this
//! engine executes, with the CDB usage data (the bits each one honours).

use crate::sense::{self, Sense};

/// (opcode, service action, CDB usage data).
type Entry = (u8, Option<u16>, &'static [u8]);

const FF4: u8 = 0xff;

static COMMANDS: &[Entry] = &[
    (0x00, None, &[0x00, 0, 0, 0, 0, 0x00]),
    (0x03, None, &[0x03, 0x00, 0, 0, FF4, 0x00]),
    (0x08, None, &[0x08, 0x1f, FF4, FF4, FF4, 0x00]),
    (0x12, None, &[0x12, 0x01, FF4, FF4, FF4, 0x00]),
    (0x1a, None, &[0x1a, 0x08, FF4, FF4, FF4, 0x00]),
    (0x1b, None, &[0x1b, 0x01, 0x00, 0x0f, 0xf7, 0x00]),
    (0x25, None, &[0x25, 0, FF4, FF4, FF4, FF4, 0, 0, 0x01, 0x00]),
    (
        0x28,
        None,
        &[0x28, 0x18, FF4, FF4, FF4, FF4, 0, FF4, FF4, 0x00],
    ),
    (
        0x2a,
        None,
        &[0x2a, 0x18, FF4, FF4, FF4, FF4, 0, FF4, FF4, 0x00],
    ),
    (
        0x35,
        None,
        &[0x35, 0x02, FF4, FF4, FF4, FF4, 0, FF4, FF4, 0x00],
    ),
    (0x42, None, &[0x42, 0x00, 0, 0, 0, 0, 0, FF4, FF4, 0x00]),
    (0x5a, None, &[0x5a, 0x08, FF4, FF4, 0, 0, 0, FF4, FF4, 0x00]),
    (0x5e, Some(0), &[0x5e, 0x1f, 0, 0, 0, 0, 0, FF4, FF4, 0x00]),
    (0x5e, Some(1), &[0x5e, 0x1f, 0, 0, 0, 0, 0, FF4, FF4, 0x00]),
    (0x5e, Some(2), &[0x5e, 0x1f, 0, 0, 0, 0, 0, FF4, FF4, 0x00]),
    (0x5e, Some(3), &[0x5e, 0x1f, 0, 0, 0, 0, 0, FF4, FF4, 0x00]),
    (
        0x5f,
        Some(0),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x5f,
        Some(1),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x5f,
        Some(2),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x5f,
        Some(3),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x5f,
        Some(4),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x5f,
        Some(5),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x5f,
        Some(6),
        &[0x5f, 0x1f, FF4, 0, 0, FF4, FF4, FF4, FF4, 0x00],
    ),
    (
        0x88,
        None,
        &[
            0x88, 0x18, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00,
        ],
    ),
    (
        0x8a,
        None,
        &[
            0x8a, 0x18, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00,
        ],
    ),
    (
        0x91,
        None,
        &[
            0x91, 0x02, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00,
        ],
    ),
    (
        0x9e,
        Some(0x10),
        &[
            0x9e, 0x1f, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00,
        ],
    ),
    (
        0xa0,
        None,
        &[0xa0, 0, FF4, 0, 0, 0, FF4, FF4, FF4, FF4, 0, 0x00],
    ),
    (
        0xa3,
        Some(0x0c),
        &[0xa3, 0x1f, 0x87, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00],
    ),
    (
        0xa8,
        None,
        &[0xa8, 0x18, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00],
    ),
    (
        0xaa,
        None,
        &[0xaa, 0x18, FF4, FF4, FF4, FF4, FF4, FF4, FF4, FF4, 0, 0x00],
    ),
];

/// Command timeouts descriptor (RCTD): no timeouts reported.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn listed(unmap: bool) -> impl Iterator<Item = &'static Entry> {
    COMMANDS.iter().filter(move |e| unmap || e.0 != 0x42)
}

/// The parameter data for reporting options `options` (0: all, 1: one
/// opcode without service actions, 2: one opcode and service action).
pub fn report(options: u8, rctd: bool, opcode: u8, sa: u16, unmap: bool) -> Result<Vec<u8>, Sense> {
    match options {
        0 => {
            let mut d = vec![0u8; 4];
            for (op, s, usage) in listed(unmap) {
                d.push(*op);
                d.push(0);
                d.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | u8::from(s.is_some()));
                d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&len.to_be_bytes());
            Ok(d)
        }
        1 | 2 => {
            let has_sa = listed(unmap).any(|e| e.0 == opcode && e.1.is_some());
            // Option 1 is for opcodes without service actions, 2 for those with.
            if (options == 1 && has_sa)
                || (options == 2 && !has_sa && listed(unmap).any(|e| e.0 == opcode))
            {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let found = listed(unmap).find(|e| e.0 == opcode && (options == 1 || e.1 == Some(sa)));
            let mut d = vec![0u8, if rctd { 0x80 } else { 0 }];
            match found {
                Some((_, _, usage)) => {
                    d[1] |= 0x03; // supported, as the standard says
                    d.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(usage);
                }
                None => {
                    d[1] |= 0x01; // not supported
                    d.extend_from_slice(&[0, 0]);
                }
            }
            if rctd {
                d.extend_from_slice(&TIMEOUTS);
            }
            Ok(d)
        }
        _ => Err(sense::INVALID_FIELD_IN_CDB),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_usage_matches_the_cdb_length_and_parses() {
        for (op, sa, usage) in COMMANDS {
            assert_eq!(Some(usage.len()), crate::cdb::cdb_len(*op), "{op:#x}");
            assert_eq!(usage[0], *op);
            // A CDB built from the opcode and service action parses.
            let mut cdb = vec![0u8; usage.len()];
            cdb[0] = *op;
            cdb[1] = sa.unwrap_or(0) as u8;
            if *op == 0xa0 {
                cdb[9] = 16;
            }
            if *op == 0xa3 {
                cdb[9] = 16;
            }
            assert!(crate::cdb::Command::parse(&cdb).is_ok(), "{op:#x}");
        }
    }

    #[test]
    fn one_command_forms() {
        let d = report(1, false, 0x28, 0, true).unwrap();
        assert_eq!(d[1] & 7, 3);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 10);
        assert_eq!(d[5] & 0x18, 0x18); // DPO and FUA honoured
        assert_eq!(
            report(1, false, 0x5e, 0, true),
            Err(sense::INVALID_FIELD_IN_CDB)
        );
        let d = report(2, false, 0x5e, 3, true).unwrap();
        assert_eq!(d[1] & 7, 3);
        let d = report(2, false, 0x5e, 9, true).unwrap();
        assert_eq!(d[1] & 7, 1);
        let d = report(1, false, 0x42, 0, false).unwrap();
        assert_eq!(d[1] & 7, 1);
        let all = report(0, true, 0, 0, true).unwrap();
        assert_eq!(all.len(), 4 + COMMANDS.len() * 20);
    }
}
