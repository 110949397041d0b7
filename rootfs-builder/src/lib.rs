//! rootfs-builder: block images for kiln (see issue 4).
#![forbid(unsafe_code)]
