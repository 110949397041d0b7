//! Per-vCPU CPUID: KVM's supported set with the APIC id, topology and hypervisor bit filled in.
//!
//! Pure functions over `kvm_cpuid_entry2` slices so the adjustments are unit-tested without KVM.
//! The topology is one package with `count` cores of one thread each; APIC id = vCPU index.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb / 0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to hold `count` distinct ids (x2APIC id shift of the core level).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Logical processors sharing a cache minus one: only level 3 is shared by all vCPUs.
fn cache_sharing(eax: u32, count: u32) -> u32 {
    let level = (eax >> 5) & 0x7;
    if level >= 3 {
        count - 1
    } else {
        0
    }
}

/// Makes sure the extended topology leaves (0xb, and 0x1f when present) have the SMT, core and
/// terminating subleaves. KVM may list only subleaf 0; a guest that then reads subleaf 1 gets
/// zeros, takes the package shift as 0 and puts every vCPU in its own package.
fn ensure_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    for function in [0xb, 0x1f] {
        if !entries.iter().any(|e| e.function == function) {
            continue;
        }
        for index in 0..=2 {
            if !entries
                .iter()
                .any(|e| e.function == function && e.index == index)
            {
                entries.push(kvm_cpuid_entry2 {
                    function,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                });
            }
        }
    }
}

/// Adjusts `entries` for vCPU `id` of `count`.
pub fn adjust_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, id: u8, count: u8) {
    let id32 = u32::from(id);
    let count32 = u32::from(count.max(1));
    ensure_topology_subleaves(entries);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors, [15:8] CLFLUSH size.
                e.ebx = (id32 << 24) | (count32 << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: [31:26] cores per package - 1, [25:14]
            // logical processors sharing the cache - 1 (only the L3 is shared). Subleaves with
            // cache type 0 end the list and stay untouched.
            4 if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x3fff)
                    | (cache_sharing(e.eax, count32) << 14)
                    | ((count32 - 1) << 26);
            }
            // AMD cache topology: same [25:14] field.
            0x8000_001d if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & !0x03ff_c000) | (cache_sharing(e.eax, count32) << 14);
            }
            // AMD: ECX [7:0] cores per package - 1, [15:12] APIC id bits of the core number.
            // Without this Linux on AMD derives the package from the whole APIC id and puts
            // every vCPU in its own package.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count32 - 1);
            }
            // AMD extended APIC id and compute unit (= core) id, one thread per core, node 0.
            0x8000_001e => {
                e.eax = id32;
                e.ebx = id32 & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                // No virtual PMU: guests should not program performance counters.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = id32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count32;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn leaves() -> Vec<kvm_cpuid_entry2> {
        let mut l3 = entry(4, 3);
        l3.eax = 3 << 5 | 0x3;
        vec![
            entry(1, 0),
            l3,
            entry(0xa, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ]
    }

    #[test]
    fn missing_topology_subleaves_are_added() {
        // KVM on this project's AMD host lists only 0xb.0.
        let mut e = vec![entry(1, 0), entry(0xb, 0)];
        adjust_cpuid(&mut e, 1, 2);
        let sub = |i: u32| {
            *e.iter()
                .find(|x| x.function == 0xb && x.index == i)
                .unwrap()
        };
        assert_eq!(
            (sub(0).ecx >> 8, sub(1).ecx >> 8, sub(2).ecx >> 8),
            (1, 2, 0)
        );
        assert_eq!((sub(1).eax, sub(1).ebx, sub(1).edx), (1, 2, 1));
        assert_ne!(sub(1).flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
        assert!(e.iter().all(|x| x.function != 0x1f), "0x1f not invented");
        // Already complete leaves are not duplicated.
        let n = e.len();
        adjust_cpuid(&mut e, 1, 2);
        assert_eq!(e.len(), n);
    }

    #[test]
    fn amd_topology_leaves() {
        let mut l1d = entry(0x8000_001d, 0);
        l1d.eax = 0x121;
        let mut l3 = entry(0x8000_001d, 3);
        l3.eax = 0x4163;
        let mut end = entry(0x8000_001d, 4);
        end.eax = 0;
        let mut size = entry(0x8000_0008, 0);
        size.ecx = 0x3_7001;
        let mut e = vec![size, entry(0x8000_001e, 0), l1d, l3, end];
        adjust_cpuid(&mut e, 5, 8);
        assert_eq!(
            e[0].ecx, 0x3_3007,
            "NC = 7, ApicIdCoreIdSize = 3, other bits kept"
        );
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (5, 5, 0, 0));
        assert_eq!((e[2].eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!((e[3].eax >> 14) & 0xfff, 7, "L3 shared by all 8");
        assert_eq!(e[3].eax & 0x3fff, 0x0163, "cache level and type kept");
        assert_eq!(e[4].eax, 0, "terminating subleaf untouched");
    }

    #[test]
    fn empty_intel_cache_leaf_untouched() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 4,
            ..Default::default()
        }];
        adjust_cpuid(&mut e, 1, 4);
        assert_eq!(e[0].eax, 0);
    }

    #[test]
    fn apic_ids_and_hypervisor_bit() {
        for (id, count) in [(0u8, 1u8), (3, 4), (31, 32)] {
            let mut e = leaves();
            adjust_cpuid(&mut e, id, count);
            assert_eq!(e[0].ebx >> 24, u32::from(id));
            assert_eq!((e[0].ebx >> 16) & 0xff, u32::from(count));
            assert_eq!((e[0].ebx >> 8) & 0xff, 8);
            assert_ne!(e[0].ecx & (1 << 31), 0);
            assert_eq!(e[0].edx & (1 << 28) != 0, count > 1);
            for leaf in &e[3..6] {
                assert_eq!(
                    leaf.edx,
                    u32::from(id),
                    "x2APIC id in leaf 0xb.{}",
                    leaf.index
                );
            }
        }
    }

    #[test]
    fn topology_levels() {
        let mut e = leaves();
        adjust_cpuid(&mut e, 2, 4);
        // SMT level: one thread per core.
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx), (0, 1, 0x100));
        // Core level: 4 cores, ids need 2 bits.
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx), (2, 4, 0x201));
        // Terminating level.
        assert_eq!((e[5].eax, e[5].ebx, e[5].ecx), (0, 0, 2));
        // L3 shared by all 4, cores per package = 4.
        assert_eq!((e[1].eax >> 14) & 0xfff, 3);
        assert_eq!(e[1].eax >> 26, 3);
        // PMU hidden.
        assert_eq!(e[2].eax, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
    }
}
