//! A SCSI target device: its logical units by number, REPORT LUNS, and
//! what a command to a missing LUN gets (SPC-4 4.4.2).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cdb::Command;
use crate::lu::{LogicalUnit, Response};
use crate::sense;
use crate::ItNexus;

/// Largest LUN the flat addressing method encodes.
pub const MAX_LUN: u16 = 0x3fff;

#[derive(Default)]
pub struct Target {
    luns: BTreeMap<u16, Arc<LogicalUnit>>,
}

/// The 8-byte SAM LUN for `lun`: peripheral addressing below 256, flat
/// addressing above.
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        b[1] = lun as u8;
    }
    b
}

/// The LUN number in an 8-byte SAM LUN, if it uses the peripheral or flat
/// addressing method at the first level and no other level.
pub fn decode_lun(b: [u8; 8]) -> Option<u16> {
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u16::from(b[1])),
        1 => Some((u16::from(b[0] & 0x3f) << 8) | u16::from(b[1])),
        _ => None,
    }
}

impl Target {
    pub fn new() -> Target {
        Target::default()
    }

    pub fn add_lun(&mut self, lun: u16, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }

    pub fn lun(&self, lun: u16) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    pub fn luns(&self) -> impl Iterator<Item = (u16, &Arc<LogicalUnit>)> {
        self.luns.iter().map(|(n, l)| (*n, l))
    }

    /// Executes `cdb` addressed to `lun` (None: a LUN field this target
    /// cannot decode).
    pub fn execute(
        &self,
        nexus: &ItNexus,
        lun: Option<u16>,
        cdb: &[u8],
        data_out: &[u8],
    ) -> Response {
        if let Ok(Command::ReportLuns { alloc, .. }) = Command::parse(cdb) {
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&((self.luns.len() * 8) as u32).to_be_bytes());
            for n in self.luns.keys() {
                d.extend_from_slice(&encode_lun(*n));
            }
            d.truncate(alloc as usize);
            return Response::good(d);
        }
        match lun.and_then(|l| self.luns.get(&l)) {
            Some(lu) => lu.execute(nexus, cdb, data_out),
            None => match Command::parse(cdb) {
                Ok(Command::Inquiry {
                    evpd: false, alloc, ..
                }) => {
                    // Peripheral qualifier 3: no logical unit here.
                    let mut d = vec![0u8; 36];
                    d[0] = 0x7f;
                    d[2] = 0x06;
                    d[3] = 0x02;
                    d[4] = 31;
                    d.truncate(alloc as usize);
                    Response::good(d)
                }
                Ok(Command::RequestSense { alloc }) => {
                    let mut d = sense::LUN_NOT_SUPPORTED.to_fixed().to_vec();
                    d.truncate(alloc as usize);
                    Response::good(d)
                }
                Ok(_) => Response::check(sense::LUN_NOT_SUPPORTED),
                Err(s) => Response::check(s),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_encoding_round_trips() {
        for l in [0u16, 1, 255, 256, 0x3fff] {
            assert_eq!(decode_lun(encode_lun(l)), Some(l));
        }
        assert_eq!(encode_lun(300)[0], 0x41);
        assert_eq!(decode_lun([0x80, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_lun([0, 1, 0, 1, 0, 0, 0, 0]), None);
    }
}
