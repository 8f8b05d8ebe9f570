//! One logical unit: a disk, its persistent reservations and the unit
//! attentions pending per I_T nexus; executes parsed commands.
//!
//! Ordering guarantee: a medium access checks the reservation and runs
//! under a shared lock of the reservation state, PERSISTENT RESERVE OUT
//! under the exclusive lock. So once a PREEMPT (AND ABORT) returns, every
//! write of a preempted nexus either landed before it or is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use tandem_disk::BlockDevice;
use tracing::{debug, warn};

use crate::cdb::{Command, PrInAction};
use crate::pr::{Access, PrError, PrOutParams, PrState, SavedPr, SAVED_PR_VERSION};
use crate::sense::{self, Sense, Status};
use crate::{ItNexus, BLOCK_SIZE};

/// Unit attentions kept per nexus; older ones are dropped beyond this.
const MAX_UA: usize = 16;
/// Longest READ/WRITE accepted, in blocks (advertised in the Block Limits
/// VPD page).
pub const MAX_TRANSFER_BLOCKS: u32 = 16384;
/// Most UNMAP block descriptors accepted in one command.
const MAX_UNMAP_DESCRIPTORS: u32 = 256;

#[derive(Debug, Clone)]
pub struct LuConfig {
    /// Unit serial number (VPD page 0x80); also seeds the NAA identifier.
    pub serial: String,
    /// Refuse writes (DATA PROTECT) even if the disk is writable.
    pub read_only: bool,
    /// Advertise and execute UNMAP (the disk's discard).
    pub unmap: bool,
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub sense: Option<Sense>,
    /// Data-in, already cut to the allocation length.
    pub data: Vec<u8>,
    /// Reservation state to save (APTPL) before reporting the status.
    pub persist: Option<SavedPr>,
    /// Nexuses whose outstanding tasks a PREEMPT AND ABORT aborted.
    pub aborted: Vec<ItNexus>,
}

impl Response {
    pub fn good(data: Vec<u8>) -> Response {
        Response {
            status: Status::Good,
            sense: None,
            data,
            persist: None,
            aborted: Vec::new(),
        }
    }
    pub fn check(sense: Sense) -> Response {
        Response {
            status: Status::CheckCondition,
            sense: Some(sense),
            ..Response::good(Vec::new())
        }
    }
    pub fn conflict() -> Response {
        Response {
            status: Status::ReservationConflict,
            ..Response::good(Vec::new())
        }
    }
}

pub struct LogicalUnit {
    disk: Arc<dyn BlockDevice>,
    cfg: LuConfig,
    pr: RwLock<PrState>,
    ua: Mutex<HashMap<ItNexus, VecDeque<Sense>>>,
}

fn truncate(mut data: Vec<u8>, alloc: u32) -> Vec<u8> {
    data.truncate(alloc as usize);
    data
}

fn ascii_padded(s: &str, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| (0x20..0x7f).contains(b))
        .take(len)
        .collect();
    v.resize(len, b' ');
    v
}

/// FNV-1a, to derive a stable NAA identifier from the serial.
fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl LogicalUnit {
    /// `pr` is the restored reservation state (default for a fresh unit).
    pub fn new(disk: Arc<dyn BlockDevice>, cfg: LuConfig, pr: PrState) -> LogicalUnit {
        LogicalUnit {
            disk,
            cfg,
            pr: RwLock::new(pr),
            ua: Mutex::new(HashMap::new()),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.disk.size() / u64::from(BLOCK_SIZE)
    }

    fn read_only(&self) -> bool {
        self.cfg.read_only || !self.disk.writable()
    }

    /// A copy of the reservation state.
    pub fn pr_state(&self) -> PrState {
        self.pr.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues a unit attention for `nexus` (also used by transports, e.g.
    /// after a LUN reset).
    pub fn add_unit_attention(&self, nexus: &ItNexus, sense: Sense) {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        let q = ua.entry(nexus.clone()).or_default();
        if q.contains(&sense) {
            return;
        }
        if q.len() >= MAX_UA {
            q.pop_front();
        }
        q.push_back(sense);
    }

    fn take_unit_attention(&self, nexus: &ItNexus) -> Option<Sense> {
        let mut ua = self.ua.lock().unwrap_or_else(|e| e.into_inner());
        ua.get_mut(nexus).and_then(|q| q.pop_front())
    }

    /// Executes `cdb` from `nexus` with the data-out that arrived for it.
    pub fn execute(&self, nexus: &ItNexus, cdb: &[u8], data_out: &[u8]) -> Response {
        let cmd = match Command::parse(cdb) {
            Ok(c) => c,
            Err(s) => return Response::check(s),
        };
        debug!(?cmd, initiator = %nexus.initiator, "scsi command");
        // INQUIRY, REPORT LUNS and REQUEST SENSE neither report nor clear
        // a unit attention (SAM-5 5.14); REQUEST SENSE returns it as data.
        match cmd {
            Command::Inquiry { .. } | Command::ReportLuns { .. } => {}
            Command::RequestSense { alloc } => {
                let s = self.take_unit_attention(nexus).unwrap_or(sense::NO_SENSE);
                return Response::good(truncate(s.to_fixed().to_vec(), alloc));
            }
            _ => {
                if let Some(ua) = self.take_unit_attention(nexus) {
                    return Response::check(ua);
                }
            }
        }
        self.run(nexus, cmd, data_out)
    }

    fn access(cmd: &Command) -> Access {
        match cmd {
            Command::Read { .. } | Command::ModeSense { .. } => Access::Read,
            Command::Write { .. }
            | Command::SynchronizeCache { .. }
            | Command::Unmap { .. }
            | Command::StartStopUnit { start_only: false } => Access::Write,
            _ => Access::Always,
        }
    }

    fn run(&self, nexus: &ItNexus, cmd: Command, data_out: &[u8]) -> Response {
        if let Command::PrOut {
            action,
            scope,
            kind,
            len,
        } = cmd
        {
            return self.prout(nexus, action, scope, kind, len, data_out);
        }
        let pr = self.pr.read().unwrap_or_else(|e| e.into_inner());
        if !pr.allows(nexus, Self::access(&cmd)) {
            debug!(initiator = %nexus.initiator, "reservation conflict");
            return Response::conflict();
        }
        match cmd {
            Command::TestUnitReady | Command::StartStopUnit { .. } => Response::good(Vec::new()),
            Command::Inquiry { evpd, page, alloc } => match self.inquiry(nexus, evpd, page) {
                Ok(d) => Response::good(truncate(d, alloc)),
                Err(s) => Response::check(s),
            },
            Command::ModeSense {
                ten,
                dbd,
                pc,
                page,
                subpage,
                alloc,
            } => match self.mode_sense(ten, dbd, pc, page, subpage) {
                Ok(d) => Response::good(truncate(d, alloc)),
                Err(s) => Response::check(s),
            },
            Command::ReadCapacity10 => {
                let last = self.blocks().saturating_sub(1).min(0xffff_ffff) as u32;
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
                Response::good(d)
            }
            Command::ReadCapacity16 { alloc } => {
                let mut d = vec![0u8; 32];
                d[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
                if self.cfg.unmap {
                    d[14] = 0x80 | 0x40; // LBPME, LBPRZ
                }
                Response::good(truncate(d, alloc))
            }
            Command::ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc,
            } => match crate::opcodes::report(options, rctd, opcode, sa, self.cfg.unmap) {
                Ok(d) => Response::good(truncate(d, alloc)),
                Err(s) => Response::check(s),
            },
            Command::Read { lba, blocks } => self.read(lba, blocks),
            Command::Write { lba, blocks, fua } => self.write(lba, blocks, fua, data_out),
            Command::SynchronizeCache { lba, blocks } => {
                if let Err(s) = self.check_range(lba, blocks) {
                    return Response::check(s);
                }
                match self.disk.flush() {
                    Ok(()) => Response::good(Vec::new()),
                    Err(e) => {
                        warn!(error = %e, "flush failed");
                        Response::check(sense::WRITE_ERROR)
                    }
                }
            }
            Command::Unmap { len } => self.unmap(len, data_out),
            Command::PrIn { action, alloc } => {
                let mut d = pr.prin(action);
                if action == PrInAction::ReadKeys || action == PrInAction::ReadFullStatus {
                    // The ADDITIONAL LENGTH stays that of the full list.
                    d.truncate(alloc as usize);
                } else {
                    d = truncate(d, alloc);
                }
                Response::good(d)
            }
            Command::ReportLuns { .. } | Command::RequestSense { .. } | Command::PrOut { .. } => {
                // REPORT LUNS is the target's; the others are handled above.
                Response::check(sense::INVALID_OPCODE)
            }
        }
    }

    fn check_range(&self, lba: u64, blocks: u32) -> Result<(), Sense> {
        match lba.checked_add(u64::from(blocks)) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(sense::LBA_OUT_OF_RANGE),
        }
    }

    fn read(&self, lba: u64, blocks: u32) -> Response {
        if let Err(s) = self.check_range(lba, blocks) {
            return Response::check(s);
        }
        if blocks > MAX_TRANSFER_BLOCKS {
            return Response::check(sense::INVALID_FIELD_IN_CDB);
        }
        let mut buf = vec![0u8; blocks as usize * BLOCK_SIZE as usize];
        match self.disk.read_at(&mut buf, lba * u64::from(BLOCK_SIZE)) {
            Ok(()) => Response::good(buf),
            Err(e) => {
                warn!(error = %e, lba, blocks, "read failed");
                Response::check(sense::UNRECOVERED_READ_ERROR)
            }
        }
    }

    fn write(&self, lba: u64, blocks: u32, fua: bool, data: &[u8]) -> Response {
        if self.read_only() {
            return Response::check(sense::WRITE_PROTECTED);
        }
        if let Err(s) = self.check_range(lba, blocks) {
            return Response::check(s);
        }
        if blocks > MAX_TRANSFER_BLOCKS {
            return Response::check(sense::INVALID_FIELD_IN_CDB);
        }
        let mut len = blocks as usize * BLOCK_SIZE as usize;
        if data.len() < len {
            // The transport expected less than the CDB says (an iSCSI
            // expected data transfer length below the transfer length):
            // the transfer stops there, in whole blocks only.
            if !data.len().is_multiple_of(BLOCK_SIZE as usize) {
                return Response::check(sense::INVALID_FIELD_IN_IU);
            }
            len = data.len();
        }
        let buf = &data[..len];
        if len == 0 {
            return Response::good(Vec::new());
        }
        let r = self
            .disk
            .write_at(buf, lba * u64::from(BLOCK_SIZE))
            .and_then(|()| if fua { self.disk.flush() } else { Ok(()) });
        match r {
            Ok(()) => Response::good(Vec::new()),
            Err(e) => {
                warn!(error = %e, lba, blocks, "write failed");
                Response::check(sense::WRITE_ERROR)
            }
        }
    }

    fn unmap(&self, len: u32, data: &[u8]) -> Response {
        if !self.cfg.unmap {
            return Response::check(sense::INVALID_OPCODE);
        }
        if self.read_only() {
            return Response::check(sense::WRITE_PROTECTED);
        }
        if len == 0 {
            return Response::good(Vec::new());
        }
        let Some(p) = data.get(..len as usize) else {
            return Response::check(sense::PARAM_LIST_LENGTH_ERROR);
        };
        if p.len() < 8 {
            return Response::check(sense::PARAM_LIST_LENGTH_ERROR);
        }
        let desc_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let descs = &p[8..];
        if desc_len % 16 != 0 || desc_len > descs.len() {
            return Response::check(sense::PARAM_LIST_LENGTH_ERROR);
        }
        if desc_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Response::check(sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        let mut ranges = Vec::new();
        for d in descs[..desc_len].chunks_exact(16) {
            let mut l = [0u8; 8];
            l.copy_from_slice(&d[0..8]);
            let lba = u64::from_be_bytes(l);
            let n = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
            if let Err(s) = self.check_range(lba, n) {
                return Response::check(s);
            }
            ranges.push((lba, n));
        }
        for (lba, n) in ranges {
            if n == 0 {
                continue;
            }
            let bs = u64::from(BLOCK_SIZE);
            if let Err(e) = self.disk.discard(lba * bs, u64::from(n) * bs) {
                warn!(error = %e, "discard failed");
                return Response::check(sense::WRITE_ERROR);
            }
        }
        Response::good(Vec::new())
    }

    fn prout(
        &self,
        nexus: &ItNexus,
        action: crate::cdb::PrOutAction,
        scope: u8,
        kind: u8,
        len: u32,
        data: &[u8],
    ) -> Response {
        let params = match PrOutParams::parse(len, data) {
            Ok(p) => p,
            Err(PrError::Check(s)) => return Response::check(s),
            Err(_) => return Response::check(sense::PARAM_LIST_LENGTH_ERROR),
        };
        let mut pr = self.pr.write().unwrap_or_else(|e| e.into_inner());
        let was_aptpl = pr.aptpl;
        match pr.prout(nexus, action, scope, kind, &params) {
            Ok(out) => {
                for (n, s) in &out.unit_attentions {
                    self.add_unit_attention(n, *s);
                }
                let persist = (out.changed && (pr.aptpl || was_aptpl)).then(|| SavedPr {
                    version: SAVED_PR_VERSION,
                    state: pr.clone(),
                });
                debug!(?action, initiator = %nexus.initiator, generation = pr.generation, "persistent reserve out");
                Response {
                    persist,
                    aborted: out.aborted,
                    ..Response::good(Vec::new())
                }
            }
            Err(PrError::Conflict) => Response::conflict(),
            Err(PrError::Check(s)) => Response::check(s),
            Err(PrError::Version(_)) => Response::check(sense::INVALID_FIELD_IN_PARAM_LIST),
        }
    }

    fn inquiry(&self, nexus: &ItNexus, evpd: bool, page: u8) -> Result<Vec<u8>, Sense> {
        if !evpd {
            let mut d = vec![0u8; 96];
            d[0] = 0x00; // connected, direct access block device
            d[2] = 0x06; // SPC-4
            d[3] = 0x12; // HISUP, response data format 2
            d[4] = (d.len() - 5) as u8;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(&ascii_padded("TANDEM", 8));
            d[16..32].copy_from_slice(&ascii_padded("shared disk", 16));
            d[32..36].copy_from_slice(&ascii_padded("0001", 4));
            // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
            for (i, v) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
                d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
            }
            return Ok(d);
        }
        let mut pages = vec![0x00, 0x80, 0x83, 0xb0, 0xb1];
        if self.cfg.unmap {
            pages.push(0xb2);
        }
        let body: Vec<u8> = match page {
            0x00 => pages.clone(),
            0x80 => ascii_padded(&self.cfg.serial, self.cfg.serial.len().clamp(1, 250)),
            0x83 => {
                let mut b = Vec::new();
                // NAA locally assigned (3), binary, LU association.
                let naa = (3u64 << 60) | (fnv64(&self.cfg.serial) >> 4);
                b.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
                b.extend_from_slice(&naa.to_be_bytes());
                // T10 vendor ID, ASCII.
                let mut t10 = ascii_padded("TANDEM", 8);
                t10.extend_from_slice(&ascii_padded(&self.cfg.serial, self.cfg.serial.len()));
                t10.truncate(250);
                b.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                b.extend_from_slice(&t10);
                // Relative target port, iSCSI, PIV, target port association.
                b.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0]);
                b.extend_from_slice(&nexus.target_port.to_be_bytes());
                b
            }
            0xb0 => {
                let mut b = vec![0u8; 0x3c];
                // Optimal transfer length granularity: 8 blocks (4 KiB).
                b[2..4].copy_from_slice(&8u16.to_be_bytes());
                b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                b[8..12].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                if self.cfg.unmap {
                    b[16..20].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
                    b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                    b[24..28].copy_from_slice(&8u32.to_be_bytes());
                }
                b
            }
            0xb1 => {
                let mut b = vec![0u8; 0x3c];
                b[1] = 0x01; // medium rotation rate: non-rotating
                b
            }
            0xb2 if self.cfg.unmap => {
                // LBPU, LBPRZ; provisioning type thin.
                vec![0x00, 0x84, 0x02, 0x00]
            }
            _ => return Err(sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(d)
    }

    fn mode_sense(
        &self,
        ten: bool,
        dbd: bool,
        pc: u8,
        page: u8,
        subpage: u8,
    ) -> Result<Vec<u8>, Sense> {
        if pc == 3 {
            return Err(sense::SAVING_PARAMS_NOT_SUPPORTED);
        }
        let changeable = pc == 1;
        let caching = {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            if !changeable {
                p[2] = 0x04; // WCE: writes are cached until SYNCHRONIZE CACHE
            }
            p
        };
        let control = {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            if !changeable {
                p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
            }
            p
        };
        let pages = match (page, subpage) {
            (0x08, 0) => caching,
            (0x0a, 0) => control,
            (0x3f, 0) | (0x3f, 0xff) => [caching, control].concat(),
            _ => return Err(sense::INVALID_FIELD_IN_CDB),
        };
        let mut blockdesc = Vec::new();
        if !dbd {
            let n = self.blocks().min(0xff_ffff) as u32;
            blockdesc.extend_from_slice(&n.to_be_bytes());
            blockdesc[0] = 0; // density code
            blockdesc.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
            blockdesc[4] = 0;
        }
        let dsp = if self.read_only() { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = dsp;
            h[6..8].copy_from_slice(&(blockdesc.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, dsp, blockdesc.len() as u8]
        };
        d.extend_from_slice(&blockdesc);
        d.extend_from_slice(&pages);
        if ten {
            let l = (d.len() - 2) as u16;
            d[0..2].copy_from_slice(&l.to_be_bytes());
        } else {
            d[0] = (d.len() - 1) as u8;
        }
        Ok(d)
    }
}
