//! One iSCSI connection (and its single-connection session) as a state
//! machine: PDUs in, PDUs out, no I/O. Login with parameter negotiation,
//! SCSI commands with immediate, unsolicited and R2T-solicited data-out,
//! Data-In, NOP, task management, text (SendTargets) and logout.
//!
//! Error recovery level 0: a protocol error ends the connection
//! ([`Output::close`]), which is what RFC 7143 asks of a target that
//! cannot recover within the connection.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_scsi::target::decode_lun;
use tandem_scsi::{Command, ItNexus, Status, Target, BLOCK_SIZE};
use tracing::{debug, info, warn};

use crate::pdu::{op, reject, Digests, Pdu};
use crate::text::{self, Params, OUR_MAX_RECV};

/// Commands the initiator may have outstanding beyond ExpCmdSN.
const CMD_WINDOW: u32 = 32;
/// Writes waiting for data-out at once.
const MAX_PENDING: usize = 64;
/// Largest expected data transfer length accepted for a write.
pub const MAX_EDTL: u32 = 16 << 20;
/// Login text accumulated over continued PDUs.
const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// What this target serves, shared by its connections.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub iqn: String,
    /// Address SendTargets reports (`host:port`).
    pub portal: String,
    pub tpgt: u16,
}

/// The result of handling one PDU.
#[derive(Debug, Default)]
pub struct Output {
    pub pdus: Vec<Pdu>,
    /// LUNs whose reservation state must be saved before `pdus` are sent.
    pub persist: Vec<u16>,
    /// Close the connection after sending `pdus`.
    pub close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    FullFeature,
}

struct WriteTask {
    lun: Option<u16>,
    cdb: [u8; 16],
    edtl: u32,
    buf: Vec<u8>,
    /// Offset where the current burst (unsolicited or R2T) ends.
    burst_end: u32,
    r2t_sn: u32,
    /// DataSN the next Data-Out must carry (0 again after each R2T).
    next_data_sn: u32,
}

/// Aborted writes remembered, so their late Data-Out is dropped quietly.
const MAX_ABORTED: usize = 64;

pub struct Connection {
    info: Arc<TargetInfo>,
    target: Arc<Target>,
    phase: Phase,
    discovery: bool,
    params: Params,
    /// Digests in force for the next PDU in each direction.
    digests: Digests,
    initiator: Option<String>,
    isid: [u8; 6],
    tsih: u16,
    stat_sn: u32,
    exp_cmd_sn: u32,
    login_text: Vec<u8>,
    sent_tpgt: bool,
    tasks: HashMap<u32, WriteTask>,
    aborted: std::collections::VecDeque<u32>,
    next_ttt: u32,
}

/// Source of session handles (TSIH), unique within the process.
static NEXT_TSIH: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);

impl Connection {
    pub fn new(info: Arc<TargetInfo>, target: Arc<Target>) -> Connection {
        Connection {
            info,
            target,
            phase: Phase::Login,
            discovery: false,
            params: Params::default(),
            digests: Digests::default(),
            initiator: None,
            isid: [0; 6],
            tsih: 0,
            stat_sn: 0,
            exp_cmd_sn: 0,
            login_text: Vec::new(),
            sent_tpgt: false,
            tasks: HashMap::new(),
            aborted: std::collections::VecDeque::new(),
            next_ttt: 1,
        }
    }

    /// Login is over (full feature phase).
    pub fn logged_in(&self) -> bool {
        self.phase == Phase::FullFeature
    }

    /// Digests for the next PDU sent or received.
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// The I_T nexus of this session, once logged in.
    pub fn nexus(&self) -> Option<ItNexus> {
        let name = self.initiator.as_ref()?;
        let isid: String = self.isid.iter().map(|b| format!("{b:02x}")).collect();
        Some(ItNexus::new(format!("{name},i,0x{isid}"), self.info.tpgt))
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1)
    }

    /// Fills StatSN (advancing it when `advance`), ExpCmdSN and MaxCmdSN.
    fn seq(&mut self, p: &mut Pdu, advance: bool) {
        p.set_u32(24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        p.set_u32(28, self.exp_cmd_sn);
        p.set_u32(32, self.max_cmd_sn());
    }

    fn reject(&mut self, reason: u8, bad: &Pdu) -> Pdu {
        let mut r = Pdu::new(op::REJECT);
        r.set_flags(0x80);
        r.bhs[2] = reason;
        r.set_itt(0xffff_ffff);
        self.seq(&mut r, true);
        r.data = bad.bhs.to_vec();
        r
    }

    /// A protocol error: reject, then end the connection.
    fn fatal(&mut self, reason: u8, bad: &Pdu, why: &str) -> Output {
        warn!(
            opcode = bad.opcode(),
            why, "iscsi protocol error; closing the connection"
        );
        Output {
            pdus: vec![self.reject(reason, bad)],
            persist: Vec::new(),
            close: true,
        }
    }

    /// A PDU whose data digest did not match (its header did): rejected,
    /// and at error recovery level 0 the connection ends.
    pub fn data_digest_error(&mut self, bhs: [u8; crate::pdu::BHS_LEN]) -> Output {
        let bad = Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        };
        self.fatal(reject::DATA_DIGEST_ERROR, &bad, "data digest error")
    }

    /// Handles one PDU from the initiator.
    pub fn handle(&mut self, pdu: Pdu) -> Output {
        if self.phase == Phase::Login {
            return match pdu.opcode() {
                op::LOGIN_REQ => self.login(&pdu),
                _ => Output {
                    close: true,
                    ..Default::default()
                },
            };
        }
        let numbered = matches!(
            pdu.opcode(),
            op::SCSI_CMD | op::NOP_OUT | op::TMF_REQ | op::TEXT_REQ | op::LOGOUT_REQ
        );
        if numbered && !self.accept_cmd_sn(&pdu) {
            debug!(
                cmd_sn = pdu.u32_at(24),
                exp = self.exp_cmd_sn,
                "CmdSN outside the window; dropped"
            );
            return Output::default();
        }
        match pdu.opcode() {
            op::SCSI_CMD if self.discovery => self.fatal(
                reject::PROTOCOL_ERROR,
                &pdu,
                "SCSI command in a discovery session",
            ),
            op::SCSI_CMD => self.scsi_cmd(&pdu),
            op::DATA_OUT => self.data_out(&pdu),
            op::NOP_OUT => self.nop_out(&pdu),
            op::TMF_REQ => self.tmf(&pdu),
            op::TEXT_REQ => self.text(&pdu),
            op::LOGOUT_REQ => self.logout(&pdu),
            op::LOGIN_REQ => {
                self.fatal(reject::PROTOCOL_ERROR, &pdu, "login in full feature phase")
            }
            // SNACK needs error recovery level 1; anything else is unknown.
            _ => Output {
                pdus: vec![self.reject(reject::COMMAND_NOT_SUPPORTED, &pdu)],
                ..Default::default()
            },
        }
    }

    /// Checks and advances CmdSN (RFC 7143 4.2.2.1).
    fn accept_cmd_sn(&mut self, pdu: &Pdu) -> bool {
        let sn = pdu.u32_at(24);
        if pdu.immediate() {
            return true;
        }
        if sn != self.exp_cmd_sn {
            return false;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        true
    }

    fn login_response(
        &mut self,
        req: &Pdu,
        flags: u8,
        class: u8,
        detail: u8,
        data: Vec<u8>,
    ) -> Pdu {
        let mut r = Pdu::new(op::LOGIN_RESP);
        r.set_flags(flags);
        r.bhs[2] = 0; // version max
        r.bhs[3] = 0; // version active
        r.bhs[8..14].copy_from_slice(&self.isid);
        r.bhs[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        r.set_itt(req.itt());
        self.seq(&mut r, true);
        r.bhs[36] = class;
        r.bhs[37] = detail;
        r.data = data;
        r
    }

    fn login_fail(&mut self, req: &Pdu, class: u8, detail: u8, why: &str) -> Output {
        warn!(class, detail, why, "login refused");
        let r = self.login_response(req, 0, class, detail, Vec::new());
        Output {
            pdus: vec![r],
            persist: Vec::new(),
            close: true,
        }
    }

    fn login(&mut self, req: &Pdu) -> Output {
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if self.initiator.is_none() && self.login_text.is_empty() {
            // The first login PDU sets the sequence numbers.
            self.isid.copy_from_slice(&req.bhs[8..14]);
            self.exp_cmd_sn = req.u32_at(24);
            self.stat_sn = req.u32_at(28);
        }
        if req.bhs[3] > 0 {
            // Version-min above what this target speaks (0).
            return self.login_fail(req, 2, 5, "unsupported version");
        }
        if csg == 2 || (transit && (nsg == 2 || nsg <= csg)) {
            return self.login_fail(req, 2, 0, "bad stage transition");
        }
        if self.login_text.len() + req.data.len() > MAX_LOGIN_TEXT {
            return self.login_fail(req, 2, 0, "login text too long");
        }
        self.login_text.extend_from_slice(&req.data);
        if cont {
            // More text follows: acknowledge and wait (RFC 7143 6.2).
            let r = self.login_response(req, csg << 2, 0, 0, Vec::new());
            return Output {
                pdus: vec![r],
                ..Default::default()
            };
        }
        let pairs = match text::parse(&std::mem::take(&mut self.login_text)) {
            Ok(p) => p,
            Err(e) => return self.login_fail(req, 2, 0, &e.to_string()),
        };
        let mut answer = Vec::new();
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" => self.initiator = Some(v.clone()),
                "SessionType" => match v.as_str() {
                    "Discovery" => self.discovery = true,
                    "Normal" => self.discovery = false,
                    _ => return self.login_fail(req, 2, 7, "bad SessionType"),
                },
                "TargetName" => {
                    if *v != self.info.iqn {
                        return self.login_fail(req, 2, 3, "unknown target name");
                    }
                }
                "AuthMethod" => {
                    if v.split(',').any(|m| m == "None") {
                        answer.push((k.clone(), "None".to_string()));
                    } else {
                        return self.login_fail(req, 2, 1, "no acceptable AuthMethod");
                    }
                }
                _ => {
                    if let Some(a) = self.params.negotiate(k, v) {
                        answer.push(a);
                    }
                }
            }
        }
        if self.initiator.is_none() {
            return self.login_fail(req, 2, 7, "no InitiatorName");
        }
        if !self.discovery && !pairs.iter().any(|(k, _)| k == "TargetName") && !self.sent_tpgt {
            return self.login_fail(req, 2, 7, "no TargetName");
        }
        if !self.sent_tpgt {
            self.sent_tpgt = true;
            if !self.discovery {
                answer.push(("TargetPortalGroupTag".into(), self.info.tpgt.to_string()));
            }
        }
        if csg == 1 || (transit && nsg == 3) {
            answer.push(("MaxRecvDataSegmentLength".into(), OUR_MAX_RECV.to_string()));
        }
        let mut rflags = csg << 2;
        let full = transit && nsg == 3;
        if transit {
            rflags |= 0x80 | nsg;
        }
        if full && self.tsih == 0 {
            self.tsih = NEXT_TSIH
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .max(1);
        }
        let r = self.login_response(req, rflags, 0, 0, text::encode(&answer));
        if full {
            self.phase = Phase::FullFeature;
            self.digests = Digests {
                header: self.params.header_digest,
                data: self.params.data_digest,
            };
            info!(
                initiator = self.initiator.as_deref().unwrap_or(""),
                discovery = self.discovery,
                header_digest = self.digests.header,
                data_digest = self.digests.data,
                "iscsi login"
            );
        }
        Output {
            pdus: vec![r],
            ..Default::default()
        }
    }

    fn scsi_cmd(&mut self, pdu: &Pdu) -> Output {
        let flags = pdu.flags();
        let write = flags & 0x20 != 0;
        let edtl = pdu.u32_at(20);
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&pdu.bhs[32..48]);
        let lun = decode_lun(pdu.lun());
        if !write || edtl == 0 {
            if !pdu.data.is_empty() {
                return self.fatal(
                    reject::PROTOCOL_ERROR,
                    pdu,
                    "data with a command that writes none",
                );
            }
            return self.execute(pdu.itt(), lun, &cdb, edtl, flags & 0x40 != 0, &[]);
        }
        if edtl > MAX_EDTL {
            return self.fatal(
                reject::INVALID_PDU_FIELD,
                pdu,
                "expected data transfer length too large",
            );
        }
        let imm = pdu.data.len() as u32;
        if imm > 0 && (!self.params.immediate_data || imm > self.params.first_burst.min(edtl)) {
            return self.fatal(
                reject::PROTOCOL_ERROR,
                pdu,
                "immediate data not allowed or too long",
            );
        }
        if self.tasks.len() >= MAX_PENDING || self.tasks.contains_key(&pdu.itt()) {
            return self.fatal(
                reject::PROTOCOL_ERROR,
                pdu,
                "too many writes pending or ITT reused",
            );
        }
        let unsolicited = !self.params.initial_r2t && flags & 0x80 == 0;
        let task = WriteTask {
            lun,
            cdb,
            edtl,
            buf: pdu.data.clone(),
            burst_end: if unsolicited {
                self.params.first_burst.min(edtl)
            } else {
                imm
            },
            r2t_sn: 0,
            next_data_sn: 0,
        };
        self.tasks.insert(pdu.itt(), task);
        self.advance_write(pdu.itt(), pdu)
    }

    /// After data arrived for `itt`: run it, solicit more, or wait.
    fn advance_write(&mut self, itt: u32, pdu: &Pdu) -> Output {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return Output::default();
        };
        let have = t.buf.len() as u32;
        if have == t.edtl {
            let Some(t) = self.tasks.remove(&itt) else {
                return Output::default();
            };
            return self.execute(itt, t.lun, &t.cdb, t.edtl, false, &t.buf);
        }
        if have < t.burst_end {
            // More of this burst is on its way.
            return Output::default();
        }
        // Solicit the next burst.
        let len = self.params.max_burst.min(t.edtl - have);
        t.burst_end = have + len;
        let r2t_sn = t.r2t_sn;
        t.r2t_sn += 1;
        t.next_data_sn = 0;
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
        let mut r = Pdu::new(op::R2T);
        r.set_flags(0x80);
        r.set_lun(pdu.lun());
        r.set_itt(itt);
        r.set_u32(20, ttt);
        self.seq(&mut r, false);
        r.set_u32(36, r2t_sn);
        r.set_u32(40, have);
        r.set_u32(44, len);
        Output {
            pdus: vec![r],
            ..Default::default()
        }
    }

    fn data_out(&mut self, pdu: &Pdu) -> Output {
        let itt = pdu.itt();
        let final_pdu = pdu.flags() & 0x80 != 0;
        if self.aborted.contains(&itt) {
            // Data the initiator had sent before it saw the abort.
            return Output::default();
        }
        let Some(t) = self.tasks.get_mut(&itt) else {
            return self.fatal(
                reject::INVALID_PDU_FIELD,
                pdu,
                "data-out for no pending write",
            );
        };
        let offset = pdu.u32_at(40);
        let have = t.buf.len() as u32;
        let len = pdu.data.len() as u32;
        if pdu.u32_at(36) != t.next_data_sn {
            return self.fatal(reject::PROTOCOL_ERROR, pdu, "data-out with a wrong DataSN");
        }
        if offset != have || have.checked_add(len).is_none_or(|e| e > t.burst_end) {
            return self.fatal(
                reject::PROTOCOL_ERROR,
                pdu,
                "data-out out of order or past the burst",
            );
        }
        t.next_data_sn += 1;
        t.buf.extend_from_slice(&pdu.data);
        let have = t.buf.len() as u32;
        if final_pdu && have < t.burst_end {
            // The burst ended short of what was announced: the command
            // is not run with part of its data.
            let Some(t) = self.tasks.remove(&itt) else {
                return Output::default();
            };
            warn!(
                itt,
                have,
                announced = t.edtl,
                "data-out shorter than announced"
            );
            let resp = tandem_scsi::Response::check(tandem_scsi::sense::DATA_PHASE_ERROR);
            return self.respond(itt, t.lun, &t.cdb, t.edtl, false, resp);
        }
        if !final_pdu && have == t.burst_end {
            return self.fatal(
                reject::PROTOCOL_ERROR,
                pdu,
                "burst complete without the F bit",
            );
        }
        if final_pdu {
            return self.advance_write(itt, pdu);
        }
        Output::default()
    }

    fn execute(
        &mut self,
        itt: u32,
        lun: Option<u16>,
        cdb: &[u8; 16],
        edtl: u32,
        read: bool,
        data_out: &[u8],
    ) -> Output {
        let Some(nexus) = self.nexus() else {
            return Output {
                close: true,
                ..Default::default()
            };
        };
        let resp = self.target.execute(&nexus, lun, cdb, data_out);
        self.respond(itt, lun, cdb, edtl, read, resp)
    }

    /// Data-In and the SCSI Response for a finished command.
    fn respond(
        &mut self,
        itt: u32,
        lun: Option<u16>,
        cdb: &[u8; 16],
        edtl: u32,
        read: bool,
        resp: tandem_scsi::Response,
    ) -> Output {
        let mut out = Output::default();
        if resp.persist.is_some() {
            if let Some(l) = lun {
                out.persist.push(l);
            }
        }
        let lun_bytes = lun.map(tandem_scsi::target::encode_lun).unwrap_or([0; 8]);
        // Data-in, cut to what the initiator expects.
        let sent = if read {
            resp.data.len().min(edtl as usize)
        } else {
            0
        };
        let mut data_sn = 0u32;
        let mut offset = 0usize;
        let chunk = self.params.peer_max_recv.max(512) as usize;
        while offset < sent {
            let end = (offset + chunk).min(sent);
            let mut d = Pdu::new(op::DATA_IN);
            d.set_flags(if end == sent { 0x80 } else { 0 });
            d.set_lun(lun_bytes);
            d.set_itt(itt);
            d.set_u32(20, 0xffff_ffff);
            self.seq(&mut d, false);
            d.set_u32(36, data_sn);
            d.set_u32(40, offset as u32);
            d.data = resp.data[offset..end].to_vec();
            out.pdus.push(d);
            data_sn += 1;
            offset = end;
        }
        // Residuals against the expected data transfer length: for data-in
        // what the command produced (valid with GOOD status), for data-out
        // what the CDB asks for.
        let wanted = if read {
            (resp.status == Status::Good).then_some(resp.data.len() as u64)
        } else {
            Command::parse(cdb)
                .ok()
                .map(|c| c.data_out_len(BLOCK_SIZE))
                .filter(|&n| n > 0 || edtl > 0)
        };
        let mut r = Pdu::new(op::SCSI_RESP);
        let mut f = 0x80;
        let residual = match wanted {
            Some(w) if w > u64::from(edtl) => {
                f |= 0x04;
                w - u64::from(edtl)
            }
            Some(w) if w < u64::from(edtl) => {
                f |= 0x02;
                u64::from(edtl) - w
            }
            _ => 0,
        };
        r.set_flags(f);
        r.bhs[2] = 0;
        r.bhs[3] = resp.status as u8;
        r.set_itt(itt);
        self.seq(&mut r, true);
        r.set_u32(36, data_sn);
        r.set_u32(44, residual.min(u64::from(u32::MAX)) as u32);
        if let Some(s) = resp.sense {
            let fixed = s.to_fixed();
            r.data = (fixed.len() as u16).to_be_bytes().to_vec();
            r.data.extend_from_slice(&fixed);
        }
        out.pdus.push(r);
        out
    }

    fn nop_out(&mut self, pdu: &Pdu) -> Output {
        if pdu.itt() == 0xffff_ffff {
            // An answer to a NOP-In ping; this target sends none.
            return Output::default();
        }
        let mut r = Pdu::new(op::NOP_IN);
        r.set_flags(0x80);
        r.set_lun(pdu.lun());
        r.set_itt(pdu.itt());
        r.set_u32(20, 0xffff_ffff);
        self.seq(&mut r, true);
        let n = pdu.data.len().min(self.params.peer_max_recv as usize);
        r.data = pdu.data[..n].to_vec();
        Output {
            pdus: vec![r],
            ..Default::default()
        }
    }

    fn tmf(&mut self, pdu: &Pdu) -> Output {
        let function = pdu.flags() & 0x7f;
        let lun = decode_lun(pdu.lun());
        let lun_known = lun.and_then(|l| self.target.lun(l)).is_some();
        let response = match function {
            // ABORT TASK: a write still waiting for data is dropped (no
            // response for it); a task already answered does not exist.
            1 => {
                let itt = pdu.u32_at(20);
                if self.tasks.remove(&itt).is_some() {
                    self.remember_aborted(itt);
                    0
                } else {
                    // Already answered (commands run as they arrive).
                    1
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET.
            2 | 4 | 5 => {
                if !lun_known {
                    2
                } else {
                    let gone: Vec<u32> = self
                        .tasks
                        .iter()
                        .filter(|(_, t)| t.lun == lun)
                        .map(|(i, _)| *i)
                        .collect();
                    for itt in gone {
                        self.tasks.remove(&itt);
                        self.remember_aborted(itt);
                    }
                    0
                }
            }
            // CLEAR ACA (no ACA is ever established), TARGET WARM RESET.
            3 | 6 => {
                if function == 6 {
                    let gone: Vec<u32> = self.tasks.keys().copied().collect();
                    for itt in gone {
                        self.tasks.remove(&itt);
                        self.remember_aborted(itt);
                    }
                }
                0
            }
            // TARGET COLD RESET, TASK REASSIGN: not supported.
            _ => 5,
        };
        debug!(function, response, "task management");
        let mut r = Pdu::new(op::TMF_RESP);
        r.set_flags(0x80);
        r.bhs[2] = response;
        r.set_itt(pdu.itt());
        self.seq(&mut r, true);
        Output {
            pdus: vec![r],
            ..Default::default()
        }
    }

    fn remember_aborted(&mut self, itt: u32) {
        if self.aborted.len() == MAX_ABORTED {
            self.aborted.pop_front();
        }
        self.aborted.push_back(itt);
    }

    fn text(&mut self, pdu: &Pdu) -> Output {
        let pairs = match text::parse(&pdu.data) {
            Ok(p) => p,
            Err(_) => return self.fatal(reject::PROTOCOL_ERROR, pdu, "bad text"),
        };
        let mut answer = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                if v == "All" || v == self.info.iqn || (v.is_empty() && !self.discovery) {
                    answer.push(("TargetName".to_string(), self.info.iqn.clone()));
                    answer.push((
                        "TargetAddress".to_string(),
                        format!("{},{}", self.info.portal, self.info.tpgt),
                    ));
                }
            } else {
                answer.push((k, "NotUnderstood".to_string()));
            }
        }
        let mut r = Pdu::new(op::TEXT_RESP);
        r.set_flags(0x80);
        r.set_itt(pdu.itt());
        r.set_u32(20, 0xffff_ffff);
        self.seq(&mut r, true);
        r.data = text::encode(&answer);
        Output {
            pdus: vec![r],
            ..Default::default()
        }
    }

    fn logout(&mut self, pdu: &Pdu) -> Output {
        let mut r = Pdu::new(op::LOGOUT_RESP);
        r.set_flags(0x80);
        r.set_itt(pdu.itt());
        self.seq(&mut r, true);
        r.bhs[40..42].copy_from_slice(&2u16.to_be_bytes());
        r.bhs[42..44].copy_from_slice(&20u16.to_be_bytes());
        Output {
            pdus: vec![r],
            persist: Vec::new(),
            close: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_scsi::mem::MemDisk;
    use tandem_scsi::{LogicalUnit, LuConfig, PrState};

    const IQN: &str = "iqn.2026-11.dev.tandem:unit";

    fn conn() -> Connection {
        let lu = LogicalUnit::new(
            Arc::new(MemDisk::new(1 << 20)),
            LuConfig {
                serial: "u".into(),
                read_only: false,
                unmap: false,
            },
            PrState::default(),
        );
        let mut t = Target::new();
        t.add_lun(0, Arc::new(lu));
        let info = Arc::new(TargetInfo {
            iqn: IQN.into(),
            portal: "192.0.2.1:3260".into(),
            tpgt: 1,
        });
        Connection::new(info, Arc::new(t))
    }

    fn login_pdu(flags: u8, keys: &[(&str, &str)]) -> Pdu {
        let mut p = Pdu::new(op::LOGIN_REQ);
        p.bhs[0] |= 0x40;
        p.set_flags(flags);
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        p.set_u32(24, 10);
        p.data = text::encode(
            &keys
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        );
        p
    }

    fn tur(cmd_sn: u32, itt: u32) -> Pdu {
        let mut p = Pdu::new(op::SCSI_CMD);
        p.set_flags(0x81);
        p.set_itt(itt);
        p.set_u32(24, cmd_sn);
        p
    }

    #[test]
    fn login_in_two_stages_with_continued_text() {
        let mut c = conn();
        // Security stage, text split over two PDUs (C bit).
        let mut first = login_pdu(0x40, &[("InitiatorName", "iqn.i")]);
        first.data.pop(); // the NUL comes with the next PDU's text
        let out = c.handle(first);
        assert_eq!(out.pdus.len(), 1);
        assert!(!out.close);
        let mut second = login_pdu(
            0x80 | 1,
            &[("TargetName", IQN), ("AuthMethod", "CHAP,None")],
        );
        second.data.insert(0, 0);
        let out = c.handle(second);
        let r = &out.pdus[0];
        assert_eq!((r.bhs[36], r.bhs[37]), (0, 0));
        assert_eq!(r.flags(), 0x80 | 1);
        let keys = text::parse(&r.data).unwrap();
        assert!(keys.contains(&("AuthMethod".into(), "None".into())));
        assert!(keys.contains(&("TargetPortalGroupTag".into(), "1".into())));
        // Operational stage to full feature phase.
        let out = c.handle(login_pdu(
            0x80 | (1 << 2) | 3,
            &[("HeaderDigest", "CRC32C")],
        ));
        let r = &out.pdus[0];
        assert_eq!(r.flags(), 0x80 | (1 << 2) | 3);
        assert_ne!(u16::from_be_bytes([r.bhs[14], r.bhs[15]]), 0, "a TSIH");
        assert!(c.digests().header);
        assert!(!c.digests().data);
        assert_eq!(c.nexus().unwrap().initiator, "iqn.i,i,0x800000000001");
    }

    #[test]
    fn cmd_sn_window_and_stat_sn() {
        let mut c = conn();
        c.handle(login_pdu(
            0x80 | (1 << 2) | 3,
            &[("InitiatorName", "iqn.i"), ("TargetName", IQN)],
        ));
        let out = c.handle(tur(10, 1));
        let r = &out.pdus[0];
        assert_eq!(r.opcode(), op::SCSI_RESP);
        let stat_sn = r.u32_at(24);
        assert_eq!(r.u32_at(28), 11, "ExpCmdSN advanced");
        assert_eq!(r.u32_at(32), 11 + CMD_WINDOW - 1);
        // A CmdSN already used is dropped without an answer.
        assert!(c.handle(tur(10, 2)).pdus.is_empty());
        let out = c.handle(tur(11, 3));
        assert_eq!(out.pdus[0].u32_at(24), stat_sn + 1);
    }

    #[test]
    fn refusals() {
        let mut c = conn();
        let out = c.handle(login_pdu(0x80 | (1 << 2) | 3, &[("TargetName", IQN)]));
        assert_eq!((out.pdus[0].bhs[36], out.pdus[0].bhs[37]), (2, 7));
        assert!(out.close);
        let mut c = conn();
        let out = c.handle(login_pdu(
            0x80 | 1,
            &[
                ("InitiatorName", "i"),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP"),
            ],
        ));
        assert_eq!((out.pdus[0].bhs[36], out.pdus[0].bhs[37]), (2, 1));
        // Anything but a login before full feature phase ends it.
        let mut c = conn();
        assert!(c.handle(tur(10, 1)).close);
        // Transit to a stage before the current one.
        let mut c = conn();
        let out = c.handle(login_pdu(
            0x80 | (1 << 2),
            &[("InitiatorName", "i"), ("TargetName", IQN)],
        ));
        assert!(out.close);
    }

    #[test]
    fn discovery_send_targets() {
        let mut c = conn();
        c.handle(login_pdu(
            0x80 | (1 << 2) | 3,
            &[("InitiatorName", "iqn.i"), ("SessionType", "Discovery")],
        ));
        let mut t = Pdu::new(op::TEXT_REQ);
        t.set_flags(0x80);
        t.set_itt(4);
        t.set_u32(24, 10);
        t.data = text::encode(&[("SendTargets".into(), "All".into())]);
        let out = c.handle(t);
        let keys = text::parse(&out.pdus[0].data).unwrap();
        assert_eq!(keys[0], ("TargetName".into(), IQN.into()));
        assert_eq!(keys[1], ("TargetAddress".into(), "192.0.2.1:3260,1".into()));
        // No SCSI commands in a discovery session.
        assert!(c.handle(tur(11, 5)).close);
    }
}
