// Command kube-harness runs a real kube-apiserver, backed by an embedded etcd,
// on 127.0.0.1 for meshid's integration tests.
//
// It is a test fixture, not a cluster: there is no kubelet, controller-manager
// or scheduler. Objects (namespaces, service accounts, pods with spec.nodeName)
// only exist in the API; nothing reconciles them.
//
// On start it writes into --state-dir:
//
//	pki/ca.{crt,key}             self-signed CA for serving and client certificates
//	pki/apiserver.{crt,key}      serving certificate (SAN 127.0.0.1, ::1, localhost)
//	pki/admin.{crt,key}          client certificate CN=admin, O=system:masters
//	pki/sa.key, pki/sa.pub       ECDSA P-256 service account signing key (PKCS#8) and its public key
//	etcd/                        etcd data
//	kubeconfig                   admin kubeconfig for https://127.0.0.1:<port>
//	ready                        written once /readyz answers "ok"; holds the server URL
//
// It stops on SIGTERM or SIGINT (kube-apiserver's own signal handling), then
// stops etcd. See run.sh for the command that humans and CI use.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// The issuer and default audience of service account tokens, as in a real
// cluster with the default cluster domain.
const serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kube-harness: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("kube-harness", flag.ContinueOnError)
	stateDir := fs.String("state-dir", "", "directory for certificates, etcd data, kubeconfig and the ready marker (required)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: kube-harness --state-dir DIR [-- extra kube-apiserver flags]\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if *stateDir == "" {
		fs.Usage()
		return errors.New("--state-dir is required")
	}
	dir, err := filepath.Abs(*stateDir)
	if err != nil {
		return err
	}
	pkiDir := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pkiDir, 0o700); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(dir, "ready"))

	// Create the command first: it installs the SIGTERM/SIGINT handler that
	// also ends our run, so a signal during etcd start-up is not lost.
	apiserver := app.NewAPIServerCommand()

	pki, err := writePKI(pkiDir)
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}

	etcdURL, stopEtcd, err := startEtcd(dir)
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer stopEtcd()

	port, err := freePort()
	if err != nil {
		return err
	}
	serverURL := "https://127.0.0.1:" + strconv.Itoa(port)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, serverURL, pki); err != nil {
		return err
	}

	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		// The "kubernetes" Service endpoints would point at loopback, which
		// Endpoints validation rejects; nothing here needs that Service.
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caCert,
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + pki.saPub,
		"--service-account-signing-key-file=" + pki.saKey,
		"--api-audiences=" + serviceAccountIssuer,
		"--authorization-mode=Node,RBAC",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=0",
	}
	args = append(args, fs.Args()...)
	apiserver.SetArgs(args)

	go announceWhenReady(apiserver.Context(), dir, serverURL, pki)

	fmt.Fprintf(os.Stderr, "kube-harness: kube-apiserver on %s, etcd on %s, state in %s\n", serverURL, etcdURL, dir)
	if code := cli.Run(apiserver); code != 0 {
		return fmt.Errorf("kube-apiserver exited with code %d", code)
	}
	return nil
}

// announceWhenReady polls /readyz as the admin and writes the "ready" marker
// (holding the server URL) once every readiness check passes, including the
// RBAC bootstrap roles.
func announceWhenReady(ctx context.Context, dir, serverURL string, pki pkiFiles) {
	client, err := adminHTTPClient(pki)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kube-harness: readiness client: %v\n", err)
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(250 * time.Millisecond):
		}
		resp, err := client.Get(serverURL + "/readyz")
		if err != nil {
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && string(body) == "ok" {
			break
		}
	}
	tmp := filepath.Join(dir, "ready.tmp")
	if err := os.WriteFile(tmp, []byte(serverURL+"\n"), 0o644); err == nil {
		_ = os.Rename(tmp, filepath.Join(dir, "ready"))
	}
	fmt.Fprintf(os.Stderr, "kube-harness: ready at %s\n", serverURL)
}

func adminHTTPClient(pki pkiFiles) (*http.Client, error) {
	caPEM, err := os.ReadFile(pki.caCert)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(pki.adminCert, pki.adminKey)
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      roots,
			Certificates: []tls.Certificate{cert},
		}},
	}, nil
}

// startEtcd runs a single-member etcd on two free loopback ports with its data
// under dir/etcd. Durability is traded for speed: this data is thrown away.
func startEtcd(dir string) (clientURL string, stop func(), err error) {
	clientPort, err := freePort()
	if err != nil {
		return "", nil, err
	}
	peerPort, err := freePort()
	if err != nil {
		return "", nil, err
	}
	client := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
	peer := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}

	cfg := embed.NewConfig()
	cfg.Name = "harness"
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = true
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(dir, "etcd.log")}

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return "", nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return "", nil, err
	case <-time.After(60 * time.Second):
		e.Close()
		return "", nil, errors.New("etcd was not ready within 60s")
	}
	return client.String(), e.Close, nil
}

// freePort asks the kernel for an unused port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

type pkiFiles struct {
	caCert, caKey           string
	servingCert, servingKey string
	adminCert, adminKey     string
	saKey, saPub            string
}

// writePKI generates fresh key material into dir. Everything is ECDSA P-256.
func writePKI(dir string) (pkiFiles, error) {
	p := pkiFiles{
		caCert: filepath.Join(dir, "ca.crt"), caKey: filepath.Join(dir, "ca.key"),
		servingCert: filepath.Join(dir, "apiserver.crt"), servingKey: filepath.Join(dir, "apiserver.key"),
		adminCert: filepath.Join(dir, "admin.crt"), adminKey: filepath.Join(dir, "admin.key"),
		saKey: filepath.Join(dir, "sa.key"), saPub: filepath.Join(dir, "sa.pub"),
	}
	now := time.Now()

	caKey, err := writeKey(p.caKey)
	if err != nil {
		return p, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "meshid kube-harness CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return p, err
	}
	if err := writePEM(p.caCert, "CERTIFICATE", caDER); err != nil {
		return p, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return p, err
	}

	leaf := func(certPath, keyPath string, tmpl *x509.Certificate) error {
		key, err := writeKey(keyPath)
		if err != nil {
			return err
		}
		tmpl.SerialNumber = serial()
		tmpl.NotBefore = now.Add(-time.Hour)
		tmpl.NotAfter = now.Add(365 * 24 * time.Hour)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.BasicConstraintsValid = true
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		return writePEM(certPath, "CERTIFICATE", der)
	}
	if err := leaf(p.servingCert, p.servingKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.IPv4(10, 96, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return p, err
	}
	if err := leaf(p.adminCert, p.adminKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return p, err
	}

	saKey, err := writeKey(p.saKey)
	if err != nil {
		return p, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return p, err
	}
	return p, writePEM(p.saPub, "PUBLIC KEY", saPubDER)
}

// writeKey generates a P-256 key and writes it as a PKCS#8 "PRIVATE KEY".
func writeKey(path string) (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return key, writePEM(path, "PRIVATE KEY", der)
}

func writePEM(path, blockType string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), 0o600)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

func writeKubeconfig(path, serverURL string, p pkiFiles) error {
	// Inline the PEM so the file stands alone.
	read := func(f string) (string, error) {
		b, err := os.ReadFile(f)
		return base64.StdEncoding.EncodeToString(b), err
	}
	ca, err := read(p.caCert)
	if err != nil {
		return err
	}
	cert, err := read(p.adminCert)
	if err != nil {
		return err
	}
	key, err := read(p.adminKey)
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kube-harness
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: kube-harness
  context:
    cluster: kube-harness
    user: admin
current-context: kube-harness
`, serverURL, ca, cert, key)
	return os.WriteFile(path, []byte(cfg), 0o600)
}
