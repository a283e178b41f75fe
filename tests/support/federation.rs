//! Three hubs as real processes on loopback: a central hub and two province hubs, each with its
//! own queue prefix on the shared RabbitMQ (or its own embedded queues), linked by `[uplink]`
//! and `[[peer]]`.

use super::power_cut::PowerCutDisk;
use super::*;

/// The central hub's code (the national axis is run by the Government Office).
pub const CENTRAL: &str = "000.00.00.G22";
/// A ministry the central hub serves.
pub const MINISTRY_HOME_AFFAIRS: &str = "000.00.00.G13";
/// Province A (the test directory's province) and a commune of it.
pub const PROVINCE_A: &str = PROVINCE;
pub const COMMUNE_A: &str = COMMUNE;
/// Province B and a commune of it. The code H54 is illustrative.
pub const PROVINCE_B: &str = "000.00.00.H54";
pub const COMMUNE_B: &str = "000.21.31.H54";

/// One hub process with its files and options.
#[derive(Debug)]
pub struct FederatedHub {
    pub process: HubProcess,
    pub files: HubFiles,
    pub options: HubOptions,
    /// The disk of its data, when it was started on one that can lose its power.
    pub disk: Option<PowerCutDisk>,
}

impl FederatedHub {
    async fn start(name: &str, options: HubOptions, on_power_cut_disk: bool) -> FederatedHub {
        let options = HubOptions {
            http_listen: format!("127.0.0.1:{}", free_port()),
            ..options
        };
        let files = HubFiles::create(name, &options);
        let disk = on_power_cut_disk.then(|| PowerCutDisk::mount(&files.data_dir()));
        let process = HubProcess::start(&files, &options).await;
        FederatedHub {
            process,
            files,
            options,
            disk,
        }
    }

    pub async fn client(&self, agency: &str) -> ExchangeClient {
        self.process.client(agency).await
    }

    pub fn endpoint(&self) -> &str {
        &self.process.endpoint
    }

    /// SIGKILL, `down` without a process, then a new one on the same files and port.
    pub async fn restart_after(&mut self, down: Duration) {
        self.process.child.kill().await.expect("kill the hub");
        tokio::time::sleep(down).await;
        self.process = HubProcess::start(&self.files, &self.options).await;
    }

    async fn finish(self) {
        let FederatedHub {
            process,
            files,
            options,
            disk,
        } = self;
        process.kill().await;
        // Unmounted before the hub's directory, which holds the mount point, is removed.
        drop(disk);
        if options.kind != TransportKind::Amqp {
            return;
        }
        let config = files.config();
        let queues: Vec<AgencyCode> = options
            .agencies
            .iter()
            .flatten()
            .map(|code| code.parse().expect("valid code"))
            .chain(lienthong::federation::neighbour_queues(&config))
            .collect();
        lienthong::transport::amqp::delete_topology(
            &amqp_url(),
            &TopologyNames::new(&files.prefix),
            &queues,
        )
        .await
        .expect("delete the test topology");
    }
}

/// A central hub and two province hubs.
#[derive(Debug)]
pub struct Federation {
    pub central: FederatedHub,
    pub province_a: FederatedHub,
    pub province_b: FederatedHub,
}

impl Federation {
    /// Starts the three hubs on `kind` (each on RabbitMQ under its own prefix, or each with
    /// its own embedded queues).
    pub async fn start(name: &str, kind: TransportKind) -> Federation {
        Federation::start_with(name, kind, false).await
    }

    /// As [`Federation::start`], the central hub's data on a [`PowerCutDisk`] when
    /// `central_on_power_cut_disk`.
    pub async fn start_with(
        name: &str,
        kind: TransportKind,
        central_on_power_cut_disk: bool,
    ) -> Federation {
        let central_port = free_port();
        let base = HubOptions {
            prefetch: 64,
            ..HubOptions::new(kind)
        };
        let central = FederatedHub::start(
            &format!("{name}-central"),
            HubOptions {
                grpc_listen: format!("127.0.0.1:{central_port}"),
                hub_code: CENTRAL.into(),
                role: "central",
                agencies: Some(vec![CENTRAL.into(), MINISTRY_HOME_AFFAIRS.into()]),
                extra_toml: format!(
                    "[[peer]]\nprovince = \"H53\"\nidentity = \"{PROVINCE_A}\"\n[[peer]]\nprovince = \"H54\"\nidentity = \"{PROVINCE_B}\"\n"
                ),
                ..base.clone()
            },
            central_on_power_cut_disk,
        )
        .await;
        let uplink = format!(
            "[uplink]\nhub = \"{CENTRAL}\"\nendpoint = \"http://127.0.0.1:{central_port}\"\n"
        );
        let province_a = FederatedHub::start(
            &format!("{name}-a"),
            HubOptions {
                hub_code: PROVINCE_A.into(),
                agencies: Some(vec![PROVINCE_A.into(), COMMUNE_A.into(), COMMUNE_2.into()]),
                extra_toml: uplink.clone(),
                ..base.clone()
            },
            false,
        )
        .await;
        let province_b = FederatedHub::start(
            &format!("{name}-b"),
            HubOptions {
                hub_code: PROVINCE_B.into(),
                agencies: Some(vec![PROVINCE_B.into(), COMMUNE_B.into()]),
                extra_toml: uplink,
                ..base
            },
            false,
        )
        .await;
        Federation {
            central,
            province_a,
            province_b,
        }
    }

    /// Stops the three processes and deletes their topologies.
    pub async fn finish(self) {
        self.central.finish().await;
        self.province_a.finish().await;
        self.province_b.finish().await;
    }
}
