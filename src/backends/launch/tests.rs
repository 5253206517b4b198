//! The planner's paths, grids and limits for the issue shapes and the documented devices.

use super::*;
use crate::config::Head;

fn shape(rows: usize, classes: usize) -> RowShape {
    RowShape {
        rows,
        classes,
        row_stride: classes,
    }
}

#[test]
fn split_counts() {
    let d = DeviceShape::H200; // 528 resident partial blocks (264 for f64)
    assert_eq!(split_count(1, 1, 4, d), 1);
    assert_eq!(split_count(0, 100, 4, d), 1);
    assert_eq!(split_count(4, 11_777, 4, d), 3);
    assert_eq!(split_count(64, 1_000_000, 4, d), 16);
    assert_eq!(split_count(64, 1_000_000, 8, d), 8);
    assert_eq!(split_count(512, 1_000_000, 2, d), 2);
    assert_eq!(split_count(1024, 32_000, 2, d), 1);
    assert_eq!(split_count(2, 1_000_000, 4, d), 245);
}

#[test]
fn path_boundary_per_dtype_and_device() {
    let cfg = MarginSoftmaxLoss::new(Head::arcface());
    for device in [DeviceShape::DEFAULT, DeviceShape::H200] {
        let planner = Planner::device(device);
        for size in [2usize, 4, 8] {
            let limit = planner.fused_max_classes(size);
            match planner
                .loss_and_grad(&cfg, shape(3, limit), size, false)
                .unwrap()
            {
                LossAndGradPlan::Fused { fused, .. } => {
                    let shared = fused.shared_mem_bytes as usize;
                    assert!(shared >= (limit + 16 / size - 1) * size);
                    assert!(shared + FUSED_STATIC_RESERVE <= device.max_shared_per_block);
                }
                other => panic!("C = {limit}, size {size}: {other:?}"),
            }
            // Past one block: a cluster where the device has them, else the split path.
            let wider = planner
                .loss_and_grad(&cfg, shape(3, limit + 1), size, false)
                .unwrap();
            if device.clusters {
                assert!(
                    matches!(wider, LossAndGradPlan::FusedCluster { .. }),
                    "{wider:?}"
                );
            } else {
                assert!(matches!(wider, LossAndGradPlan::Split { .. }), "{wider:?}");
            }
        }
    }
}

#[test]
fn warp_path_for_narrow_rows() {
    let cfg = MarginSoftmaxLoss::new(Head::softmax());
    let planner = Planner::device(DeviceShape::DEFAULT);
    for size in [2usize, 4, 8] {
        let limit = warp_max_classes(size);
        match planner
            .loss_and_grad(&cfg, shape(17, limit), size, false)
            .unwrap()
        {
            LossAndGradPlan::FusedWarp { fused, .. } => {
                assert_eq!(fused.grid, [3, 1, 1]);
                assert!(fused.shared_mem_bytes as usize <= WARP_SHARED);
            }
            other => panic!("{other:?}"),
        }
        let wider = planner.loss_and_grad(&cfg, shape(17, limit + 1), size, false);
        assert!(matches!(wider.unwrap(), LossAndGradPlan::Fused { .. }));
    }
}

#[test]
fn cluster_path_on_h200() {
    let cfg = MarginSoftmaxLoss::new(Head::arcface());
    let h200 = Planner::device(DeviceShape::H200);
    let plan = |c: usize, size: usize| h200.loss_and_grad(&cfg, shape(4096, c), size, false);
    // The shapes: (8192, 32000) one block per row; (4096, 128256) bf16 a cluster.
    assert!(matches!(
        plan(32_000, 2).unwrap(),
        LossAndGradPlan::Fused { .. }
    ));
    match plan(128_256, 2).unwrap() {
        LossAndGradPlan::FusedCluster { cluster, .. } => {
            assert_eq!(cluster.grid, [4096 * 8, 1, 1]);
            assert_eq!(cluster_slice(128_256, 2), 16_032);
            assert_eq!(
                cluster.shared_mem_bytes as usize,
                fused_shared_bytes(16_032, 2)
            );
        }
        other => panic!("{other:?}"),
    }
    for size in [2usize, 4, 8] {
        let limit = h200.one_pass_max_classes(size);
        let slice = cluster_slice(limit, size);
        assert!(fused_shared_bytes(slice, size) + FUSED_STATIC_RESERVE <= 227 * 1024);
        assert!(matches!(
            plan(limit, size).unwrap(),
            LossAndGradPlan::FusedCluster { .. }
        ));
        assert!(matches!(
            plan(limit + 1, size).unwrap(),
            LossAndGradPlan::FusedL2 { .. }
        ));
    }
    // No clusters without the capability: one block, then the L2 kernel.
    let a100 = Planner::device(DeviceShape {
        clusters: false,
        ..DeviceShape::H200
    });
    let plan = a100
        .loss_and_grad(&cfg, shape(4096, 128_256), 2, false)
        .unwrap();
    assert!(matches!(plan, LossAndGradPlan::FusedL2 { .. }));
    // Nor the L2 kernel without cooperative launch: the split path.
    let plain = Planner::device(DeviceShape {
        cooperative: false,
        ..DeviceShape::H200
    });
    let plan = plain
        .loss_and_grad(&cfg, shape(64, 1_000_000), 4, false)
        .unwrap();
    assert!(matches!(plan, LossAndGradPlan::Split { .. }));
}

/// The rows past a cluster on an H200 (50 MiB of L2, a group within a third of it).
#[test]
fn l2_path_on_h200() {
    let h200 = Planner::device(DeviceShape::H200);
    let check = |cfg: &MarginSoftmaxLoss, rows, classes, size, want: (usize, usize, u32)| {
        match h200
            .loss_and_grad(cfg, shape(rows, classes), size, false)
            .unwrap()
        {
            LossAndGradPlan::FusedL2 {
                params,
                launch,
                work:
                    L2Work {
                        group_rows,
                        partials_len,
                    },
                ..
            } => {
                assert_eq!((group_rows, params.splits as usize, launch.grid[0]), want);
                assert_eq!(partials_len, rows * want.1 * PARTIAL_COLUMNS);
                // A group's inputs within a third of the L2 (or one row).
                assert!(group_rows == 1 || group_rows * classes * size <= (50 << 20) / 3);
                // A phase gives each block at most one slice to read and one to write.
                assert!(group_rows * want.1 <= launch.grid[0] as usize);
            }
            other => panic!("{other:?}"),
        }
    };
    let arcface = MarginSoftmaxLoss::new(Head::arcface());
    // (512, 1e6) bf16: 2 MB rows, 8 a group, 396 blocks (3 per SM), 49 slices of ~20k.
    check(&arcface, 512, 1_000_000, 2, (8, 49, 396));
    // (64, 1e6) f32: 4 MB rows, 4 a group, 99 slices.
    check(&arcface, 64, 1_000_000, 4, (4, 99, 396));
    // f64 and the `_ext` entries: 2 blocks per SM.
    check(&arcface, 64, 1_000_000, 8, (2, 132, 264));
    let mut smooth = MarginSoftmaxLoss::new(Head::arcface());
    smooth.label_smoothing = 0.1;
    check(&smooth, 64, 1_000_000, 4, (4, 66, 264));
    // One row wider than the budget: a group of one, slices of at least 4096 columns.
    check(&arcface, 3, 10_000_000, 4, (1, 396, 396));
    check(&arcface, 3, 500_000, 8, (3, 88, 264));
    // The grid cap bounds the grid, hence the slices.
    let capped = Planner::grid_cap(16, DeviceShape::H200);
    match capped
        .loss_and_grad(&arcface, shape(2, 460_769), 4, false)
        .unwrap()
    {
        LossAndGradPlan::FusedL2 {
            params,
            launch,
            work: L2Work { group_rows, .. },
            ..
        } => assert_eq!((group_rows, params.splits, launch.grid[0]), (2, 8, 16)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn variants() {
    let mut cfg = MarginSoftmaxLoss::new(Head::softmax());
    assert_eq!(kernel_variant(&cfg, false), "identity");
    assert_eq!(kernel_variant(&cfg, true), "identity_ext");
    cfg.label_smoothing = 0.1;
    assert_eq!(kernel_variant(&cfg, false), "identity_ext");
    let cfg = MarginSoftmaxLoss::new(Head::arcface());
    assert_eq!(kernel_variant(&cfg, false), "cosine");
    let cfg = MarginSoftmaxLoss::new(Head::rbf());
    assert_eq!(kernel_variant(&cfg, false), "rbf");
    for (i, v) in [
        "identity",
        "cosine",
        "rbf",
        "identity_ext",
        "cosine_ext",
        "rbf_ext",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(variant_index(v), i as i32);
    }
}

#[test]
fn grids_are_capped_and_never_empty() {
    let cfg = MarginSoftmaxLoss::new(Head::softmax());
    let p = Planner::device(DeviceShape::H200)
        .forward(&cfg, shape(100_000, 8), 4, false)
        .unwrap();
    assert_eq!(p.partial.grid, [MAX_GRID as u32, 1, 1]);
    assert_eq!(p.partials_len, 100_000 * PARTIAL_COLUMNS);
    let b = Planner::grid_cap(3, DeviceShape::DEFAULT)
        .backward(&cfg, shape(10, 5000), 4)
        .unwrap();
    assert_eq!(b.backward.grid, [3, 3, 1]);
    let one = Planner::grid_cap(0, DeviceShape::DEFAULT)
        .backward(&cfg, shape(1, 1), 2)
        .unwrap();
    assert_eq!(one.backward.grid, [1, 1, 1]);
}
