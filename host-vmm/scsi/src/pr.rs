//! SPC-4 persistent reservations (5.12 and 6.15/6.16) as a pure state
//! machine: registrations, the reservation, the generation, APTPL, the
//! unit attentions each change causes, and which commands conflict with a
//! reservation (SPC-4 table "SPC commands that are allowed in the presence
//! of various reservations" and its SBC-3 counterpart).
//!
//! [`PrState`] is also the saved format (serde): the caller writes it when
//! an operation reports `changed` and the state has APTPL set.

use serde::{Deserialize, Serialize};

use crate::cdb::{PrInAction, PrOutAction};
use crate::sense::{self, Sense};
use crate::ItNexus;

/// The six reservation types (SPC-4 table 169).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl ResType {
    pub fn from_code(code: u8) -> Option<ResType> {
        Some(match code {
            1 => ResType::WriteExclusive,
            3 => ResType::ExclusiveAccess,
            5 => ResType::WriteExclusiveRegistrantsOnly,
            6 => ResType::ExclusiveAccessRegistrantsOnly,
            7 => ResType::WriteExclusiveAllRegistrants,
            8 => ResType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            ResType::WriteExclusive => 1,
            ResType::ExclusiveAccess => 3,
            ResType::WriteExclusiveRegistrantsOnly => 5,
            ResType::ExclusiveAccessRegistrantsOnly => 6,
            ResType::WriteExclusiveAllRegistrants => 7,
            ResType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// All registrants are reservation holders.
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            ResType::WriteExclusiveAllRegistrants | ResType::ExclusiveAccessAllRegistrants
        )
    }

    fn registrants_only(self) -> bool {
        matches!(
            self,
            ResType::WriteExclusiveRegistrantsOnly | ResType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Reads by non-holders are refused (the "exclusive access" types).
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            ResType::ExclusiveAccess
                | ResType::ExclusiveAccessRegistrantsOnly
                | ResType::ExclusiveAccessAllRegistrants
        )
    }
}

/// How a command is treated in the presence of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, REQUEST
    /// SENSE, TEST UNIT READY, READ CAPACITY, PERSISTENT RESERVE IN/OUT).
    Always,
    /// Reads the medium or its mode pages (READ, MODE SENSE).
    Read,
    /// Changes the medium or its mode (WRITE, SYNCHRONIZE CACHE, UNMAP,
    /// MODE SELECT, START STOP UNIT).
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub nexus: ItNexus,
    pub key: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The nexus that made the reservation (for all-registrants types every
    /// registrant holds it; this one is only remembered).
    pub holder: ItNexus,
    pub kind: ResType,
}

/// The persistent reservation state of one logical unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    pub generation: u32,
    /// Activate Persist Through Power Loss, from the last REGISTER.
    pub aptpl: bool,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
}

/// The saved form of [`PrState`] (versioned: a format, not a runtime type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPr {
    pub version: u32,
    pub state: PrState,
}

pub const SAVED_PR_VERSION: u32 = 1;

/// Registrations one logical unit keeps; more get INSUFFICIENT
/// REGISTRATION RESOURCES.
pub const MAX_REGISTRATIONS: usize = 256;

impl SavedPr {
    /// The state to restore after a restart: only what APTPL asked to keep.
    pub fn restore(self) -> Result<PrState, PrError> {
        if self.version != SAVED_PR_VERSION {
            return Err(PrError::Version(self.version));
        }
        Ok(if self.state.aptpl {
            self.state
        } else {
            PrState::default()
        })
    }
}

/// Why a PERSISTENT RESERVE OUT failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrError {
    #[error("reservation conflict")]
    Conflict,
    #[error("check condition {0:?}")]
    Check(Sense),
    #[error("saved reservation state has unknown version {0}")]
    Version(u32),
}

/// The PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3, 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrOutParams {
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
}

impl PrOutParams {
    /// `len` is the CDB's parameter list length, `data` what arrived.
    pub fn parse(len: u32, data: &[u8]) -> Result<PrOutParams, PrError> {
        if len != 24 {
            return Err(PrError::Check(sense::PARAM_LIST_LENGTH_ERROR));
        }
        let Some(d) = data.get(..24) else {
            return Err(PrError::Check(sense::PARAM_LIST_LENGTH_ERROR));
        };
        let mut k = [0u8; 8];
        k.copy_from_slice(&d[0..8]);
        let key = u64::from_be_bytes(k);
        k.copy_from_slice(&d[8..16]);
        let sa_key = u64::from_be_bytes(k);
        Ok(PrOutParams {
            key,
            sa_key,
            spec_i_pt: d[20] & 0x08 != 0,
            all_tg_pt: d[20] & 0x04 != 0,
            aptpl: d[20] & 0x01 != 0,
        })
    }
}

/// What a successful PERSISTENT RESERVE OUT did besides its own effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrOutcome {
    /// Unit attentions to queue, per nexus.
    pub unit_attentions: Vec<(ItNexus, Sense)>,
    /// Nexuses whose tasks PREEMPT AND ABORT aborts.
    pub aborted: Vec<ItNexus>,
    /// The state changed (persist it if APTPL is set, or was).
    pub changed: bool,
}

impl PrState {
    fn key_of(&self, nexus: &ItNexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| &r.nexus == nexus)
            .map(|r| r.key)
    }

    fn is_holder(&self, nexus: &ItNexus) -> bool {
        match &self.reservation {
            Some(r) if r.kind.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => &r.holder == nexus,
            None => false,
        }
    }

    /// Whether `nexus` may run a command of class `access` now (SPC-4 5.12.1
    /// table 66 and SBC-3 table 13): `false` means RESERVATION CONFLICT.
    pub fn allows(&self, nexus: &ItNexus, access: Access) -> bool {
        let Some(res) = &self.reservation else {
            return true;
        };
        if access == Access::Always || self.is_holder(nexus) {
            return true;
        }
        let registered = self.key_of(nexus).is_some();
        let kind = res.kind;
        match access {
            Access::Always => true,
            Access::Read => {
                !kind.exclusive_access()
                    || (registered && (kind.registrants_only() || kind.all_registrants()))
            }
            Access::Write => registered && (kind.registrants_only() || kind.all_registrants()),
        }
    }

    fn others(&self, nexus: &ItNexus) -> Vec<ItNexus> {
        self.registrations
            .iter()
            .filter(|r| &r.nexus != nexus)
            .map(|r| r.nexus.clone())
            .collect()
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Executes PERSISTENT RESERVE OUT from `nexus`.
    pub fn prout(
        &mut self,
        nexus: &ItNexus,
        action: PrOutAction,
        scope: u8,
        kind: u8,
        p: &PrOutParams,
    ) -> Result<PrOutcome, PrError> {
        // SPEC_I_PT and ALL_TG_PT are not supported (SIP_C = ATP_C = 0).
        if p.spec_i_pt {
            return Err(PrError::Check(sense::INVALID_FIELD_IN_PARAM_LIST));
        }
        let mine = self.key_of(nexus);
        match action {
            PrOutAction::Register | PrOutAction::RegisterAndIgnore => {
                if p.all_tg_pt {
                    return Err(PrError::Check(sense::INVALID_FIELD_IN_PARAM_LIST));
                }
                let ignore = action == PrOutAction::RegisterAndIgnore;
                self.register(nexus, mine, ignore, p)
            }
            _ => {
                // Every other action needs a registration with the key given.
                match mine {
                    Some(k) if k == p.key => {}
                    _ => return Err(PrError::Conflict),
                }
                let typed = || -> Result<ResType, PrError> {
                    if scope != 0 {
                        return Err(PrError::Check(sense::INVALID_FIELD_IN_CDB));
                    }
                    ResType::from_code(kind).ok_or(PrError::Check(sense::INVALID_FIELD_IN_CDB))
                };
                match action {
                    PrOutAction::Reserve => self.reserve(nexus, typed()?),
                    PrOutAction::Release => self.release(nexus, typed()?),
                    PrOutAction::Clear => Ok(self.clear(nexus)),
                    PrOutAction::Preempt | PrOutAction::PreemptAndAbort => {
                        let abort = action == PrOutAction::PreemptAndAbort;
                        self.preempt(nexus, typed()?, p.sa_key, abort)
                    }
                    PrOutAction::Register | PrOutAction::RegisterAndIgnore => {
                        unreachable!("handled above")
                    }
                }
            }
        }
    }

    fn register(
        &mut self,
        nexus: &ItNexus,
        mine: Option<u64>,
        ignore: bool,
        p: &PrOutParams,
    ) -> Result<PrOutcome, PrError> {
        let mut out = PrOutcome::default();
        match mine {
            None => {
                if !ignore && p.key != 0 {
                    return Err(PrError::Conflict);
                }
                if p.sa_key == 0 {
                    // Unregistered and asking for no key: nothing to do.
                    return Ok(out);
                }
                if self.registrations.len() >= MAX_REGISTRATIONS {
                    return Err(PrError::Check(sense::INSUFFICIENT_REGISTRATION_RESOURCES));
                }
                self.registrations.push(Registration {
                    nexus: nexus.clone(),
                    key: p.sa_key,
                });
            }
            Some(k) => {
                if !ignore && p.key != k {
                    return Err(PrError::Conflict);
                }
                if p.sa_key == 0 {
                    out.unit_attentions = self.unregister(nexus);
                } else if let Some(r) = self.registrations.iter_mut().find(|r| &r.nexus == nexus) {
                    r.key = p.sa_key;
                }
            }
        }
        self.aptpl = p.aptpl;
        self.bump();
        out.changed = true;
        Ok(out)
    }

    /// Removes `nexus`'s registration, releasing what it held (5.12.11.2.2).
    fn unregister(&mut self, nexus: &ItNexus) -> Vec<(ItNexus, Sense)> {
        let holder = self.is_holder(nexus);
        self.registrations.retain(|r| &r.nexus != nexus);
        let mut uas = Vec::new();
        if let Some(res) = self.reservation.clone() {
            if res.kind.all_registrants() {
                if self.registrations.is_empty() {
                    self.reservation = None;
                }
            } else if holder {
                self.reservation = None;
                if res.kind.registrants_only() {
                    uas = self
                        .others(nexus)
                        .into_iter()
                        .map(|n| (n, sense::RESERVATIONS_RELEASED))
                        .collect();
                }
            }
        }
        uas
    }

    fn reserve(&mut self, nexus: &ItNexus, kind: ResType) -> Result<PrOutcome, PrError> {
        match &self.reservation {
            Some(r) => {
                if self.is_holder(nexus) && r.kind == kind {
                    Ok(PrOutcome::default())
                } else {
                    Err(PrError::Conflict)
                }
            }
            None => {
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    kind,
                });
                Ok(PrOutcome {
                    changed: true,
                    ..Default::default()
                })
            }
        }
    }

    fn release(&mut self, nexus: &ItNexus, kind: ResType) -> Result<PrOutcome, PrError> {
        let Some(r) = self.reservation.clone() else {
            return Ok(PrOutcome::default());
        };
        if !self.is_holder(nexus) {
            return Ok(PrOutcome::default());
        }
        if r.kind != kind {
            return Err(PrError::Check(sense::INVALID_RELEASE_OF_PR));
        }
        self.reservation = None;
        let mut out = PrOutcome {
            changed: true,
            ..Default::default()
        };
        if !matches!(r.kind, ResType::WriteExclusive | ResType::ExclusiveAccess) {
            out.unit_attentions = self
                .others(nexus)
                .into_iter()
                .map(|n| (n, sense::RESERVATIONS_RELEASED))
                .collect();
        }
        Ok(out)
    }

    fn clear(&mut self, nexus: &ItNexus) -> PrOutcome {
        let uas = self
            .others(nexus)
            .into_iter()
            .map(|n| (n, sense::RESERVATIONS_PREEMPTED))
            .collect();
        self.registrations.clear();
        self.reservation = None;
        self.bump();
        PrOutcome {
            unit_attentions: uas,
            aborted: Vec::new(),
            changed: true,
        }
    }

    /// Removes the registrations of every other nexus holding `key`.
    fn remove_key(&mut self, nexus: &ItNexus, key: Option<u64>) -> Vec<ItNexus> {
        let removed: Vec<ItNexus> = self
            .registrations
            .iter()
            .filter(|r| &r.nexus != nexus && key.is_none_or(|k| r.key == k))
            .map(|r| r.nexus.clone())
            .collect();
        self.registrations
            .retain(|r| &r.nexus == nexus || key.is_some_and(|k| r.key != k));
        removed
    }

    fn preempt(
        &mut self,
        nexus: &ItNexus,
        kind: ResType,
        sa_key: u64,
        abort: bool,
    ) -> Result<PrOutcome, PrError> {
        let mut out = PrOutcome {
            changed: true,
            ..Default::default()
        };
        let removed;
        match self.reservation.clone() {
            None => {
                if sa_key == 0 {
                    return Err(PrError::Check(sense::INVALID_FIELD_IN_PARAM_LIST));
                }
                removed = self.remove_key(nexus, Some(sa_key));
                if removed.is_empty() {
                    return Err(PrError::Conflict);
                }
            }
            Some(r) if r.kind.all_registrants() => {
                if sa_key == 0 {
                    removed = self.remove_key(nexus, None);
                    self.reservation = Some(Reservation {
                        holder: nexus.clone(),
                        kind,
                    });
                } else {
                    removed = self.remove_key(nexus, Some(sa_key));
                    if removed.is_empty() {
                        return Err(PrError::Conflict);
                    }
                }
            }
            Some(r) => {
                if sa_key == 0 {
                    return Err(PrError::Check(sense::INVALID_FIELD_IN_PARAM_LIST));
                }
                let holder_key = self.key_of(&r.holder);
                if holder_key == Some(sa_key) {
                    removed = self.remove_key(nexus, Some(sa_key));
                    self.reservation = Some(Reservation {
                        holder: nexus.clone(),
                        kind,
                    });
                    if r.kind != kind {
                        out.unit_attentions = self
                            .others(nexus)
                            .into_iter()
                            .map(|n| (n, sense::RESERVATIONS_RELEASED))
                            .collect();
                    }
                } else {
                    removed = self.remove_key(nexus, Some(sa_key));
                    if removed.is_empty() {
                        return Err(PrError::Conflict);
                    }
                }
            }
        }
        out.unit_attentions.extend(
            removed
                .iter()
                .map(|n| (n.clone(), sense::REGISTRATIONS_PREEMPTED)),
        );
        if abort {
            out.aborted = removed;
        }
        self.bump();
        Ok(out)
    }

    /// The PERSISTENT RESERVE IN data for `action` (before truncation to
    /// the allocation length).
    pub fn prin(&self, action: PrInAction) -> Vec<u8> {
        let mut d = Vec::new();
        match action {
            PrInAction::ReadKeys => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                let len = (self.registrations.len() * 8) as u32;
                d.extend_from_slice(&len.to_be_bytes());
                for r in &self.registrations {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            PrInAction::ReadReservation => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                match &self.reservation {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        // All-registrants reservations report key 0.
                        let key = if r.kind.all_registrants() {
                            0
                        } else {
                            self.key_of(&r.holder).unwrap_or(0)
                        };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0; 4]);
                        d.push(0);
                        d.push(r.kind.code()); // scope 0 (LU) in the high nibble
                        d.extend_from_slice(&[0; 2]);
                    }
                }
            }
            PrInAction::ReportCapabilities => {
                d.extend_from_slice(&8u16.to_be_bytes());
                // CRH 0, SIP_C 0, ATP_C 0, PTPL_C 1.
                d.push(0x01);
                // TMV 1, ALLOW COMMANDS 0, PTPL_A.
                d.push(0x80 | u8::from(self.aptpl));
                // Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
                d.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
                d.push(0x01);
                d.extend_from_slice(&[0; 2]);
            }
            PrInAction::ReadFullStatus => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                d.extend_from_slice(&[0; 4]);
                for r in &self.registrations {
                    let tid = r.nexus.transport_id();
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    let holder = self.is_holder(&r.nexus);
                    d.push(u8::from(holder)); // ALL_TG_PT 0, R_HOLDER
                    d.push(if holder {
                        self.reservation.as_ref().map_or(0, |x| x.kind.code())
                    } else {
                        0
                    });
                    d.extend_from_slice(&[0; 4]);
                    d.extend_from_slice(&r.nexus.target_port.to_be_bytes());
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                }
                let len = (d.len() - 8) as u32;
                d[4..8].copy_from_slice(&len.to_be_bytes());
            }
        }
        d
    }
}
