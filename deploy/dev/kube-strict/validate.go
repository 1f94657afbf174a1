package main

import (
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// What strict decoding cannot see but the API server (or the kubelet) refuses: names, labels and
// selectors, port and env names, mounts of volumes that do not exist, a workload whose selector does
// not select its own pods. It is the part of the API server's validation that needs no cluster and
// uses only the exported helpers of apimachinery; the rest is the API server's own business.

var clusterScoped = map[string]bool{
	"Namespace": true, "ClusterRole": true, "ClusterRoleBinding": true, "PersistentVolume": true,
	"StorageClass": true, "PriorityClass": true, "CustomResourceDefinition": true, "Node": true,
}

func validateObject(obj runtime.Object, kind string) field.ErrorList {
	meta, ok := obj.(metav1.Object)
	if !ok {
		return nil
	}
	nameFn := apivalidation.NameIsDNSSubdomain
	switch kind {
	case "Namespace":
		nameFn = apivalidation.NameIsDNSLabel
	case "Service":
		nameFn = apivalidation.NameIsDNS1035Label
	}
	// A namespaced object may leave its namespace to kubectl's context; a cluster-scoped one must not have one.
	namespaced := !clusterScoped[kind] && meta.GetNamespace() != ""
	errs := apivalidation.ValidateObjectMetaAccessor(meta, namespaced, nameFn, field.NewPath("metadata"))
	spec := field.NewPath("spec")
	switch o := obj.(type) {
	case *appsv1.DaemonSet:
		errs = append(errs, validateWorkload(o.Spec.Selector, &o.Spec.Template, nil, spec)...)
	case *appsv1.Deployment:
		errs = append(errs, validateWorkload(o.Spec.Selector, &o.Spec.Template, nil, spec)...)
	case *appsv1.StatefulSet:
		if o.Spec.ServiceName == "" {
			errs = append(errs, field.Required(spec.Child("serviceName"), "the governing Service"))
		}
		claims := map[string]bool{}
		for i, claim := range o.Spec.VolumeClaimTemplates {
			claims[claim.Name] = true
			for _, msg := range validation.IsDNS1123Label(claim.Name) {
				errs = append(errs, field.Invalid(spec.Child("volumeClaimTemplates").Index(i).Child("metadata", "name"), claim.Name, msg))
			}
		}
		errs = append(errs, validateWorkload(o.Spec.Selector, &o.Spec.Template, claims, spec)...)
	case *corev1.Service:
		errs = append(errs, validateServicePorts(o.Spec.Ports, spec.Child("ports"))...)
	case *policyv1.PodDisruptionBudget:
		if (o.Spec.MinAvailable == nil) == (o.Spec.MaxUnavailable == nil) {
			errs = append(errs, field.Invalid(spec, "", "exactly one of minAvailable and maxUnavailable"))
		}
		errs = append(errs, validateSelector(o.Spec.Selector, spec.Child("selector"))...)
	}
	return errs
}

func validateSelector(selector *metav1.LabelSelector, path *field.Path) field.ErrorList {
	if selector == nil {
		return field.ErrorList{field.Required(path, "")}
	}
	return metav1validation.ValidateLabelSelector(selector, metav1validation.LabelSelectorValidationOptions{}, path)
}

func validateWorkload(selector *metav1.LabelSelector, template *corev1.PodTemplateSpec, claims map[string]bool, spec *field.Path) field.ErrorList {
	errs := validateSelector(selector, spec.Child("selector"))
	errs = append(errs, metav1validation.ValidateLabels(template.Labels, spec.Child("template", "metadata", "labels"))...)
	errs = append(errs, apivalidation.ValidateAnnotations(template.Annotations, spec.Child("template", "metadata", "annotations"))...)
	if selector != nil && len(errs) == 0 {
		parsed, err := metav1.LabelSelectorAsSelector(selector)
		if err != nil || !parsed.Matches(labelSet(template.Labels)) {
			errs = append(errs, field.Invalid(spec.Child("template", "metadata", "labels"), template.Labels,
				"`selector` does not match the template's labels"))
		}
	}
	return append(errs, validatePodSpec(&template.Spec, claims, spec.Child("template", "spec"))...)
}

type labelSet map[string]string

func (l labelSet) Has(key string) bool   { _, ok := l[key]; return ok }
func (l labelSet) Get(key string) string { return l[key] }
func (l labelSet) Lookup(key string) (string, bool) {
	value, ok := l[key]
	return value, ok
}

func validatePodSpec(pod *corev1.PodSpec, claims map[string]bool, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	volumes := map[string]bool{}
	for i, volume := range pod.Volumes {
		p := path.Child("volumes").Index(i).Child("name")
		for _, msg := range validation.IsDNS1123Label(volume.Name) {
			errs = append(errs, field.Invalid(p, volume.Name, msg))
		}
		if volumes[volume.Name] {
			errs = append(errs, field.Duplicate(p, volume.Name))
		}
		volumes[volume.Name] = true
	}
	if len(pod.Containers) == 0 {
		errs = append(errs, field.Required(path.Child("containers"), ""))
	}
	names := map[string]bool{}
	for i := range pod.Containers {
		c := &pod.Containers[i]
		cp := path.Child("containers").Index(i)
		for _, msg := range validation.IsDNS1123Label(c.Name) {
			errs = append(errs, field.Invalid(cp.Child("name"), c.Name, msg))
		}
		if names[c.Name] {
			errs = append(errs, field.Duplicate(cp.Child("name"), c.Name))
		}
		names[c.Name] = true
		if c.Image == "" {
			errs = append(errs, field.Required(cp.Child("image"), ""))
		}
		ports := map[string]bool{}
		for j, port := range c.Ports {
			pp := cp.Child("ports").Index(j)
			if port.Name != "" {
				for _, msg := range validation.IsValidPortName(port.Name) {
					errs = append(errs, field.Invalid(pp.Child("name"), port.Name, msg))
				}
				if ports[port.Name] {
					errs = append(errs, field.Duplicate(pp.Child("name"), port.Name))
				}
				ports[port.Name] = true
			}
			for _, msg := range validation.IsValidPortNum(int(port.ContainerPort)) {
				errs = append(errs, field.Invalid(pp.Child("containerPort"), port.ContainerPort, msg))
			}
			if port.HostPort != 0 && pod.HostNetwork && port.HostPort != port.ContainerPort {
				errs = append(errs, field.Invalid(pp.Child("hostPort"), port.HostPort, "must equal containerPort with hostNetwork"))
			}
		}
		for j, env := range c.Env {
			ep := cp.Child("env").Index(j)
			for _, msg := range validation.IsEnvVarName(env.Name) {
				errs = append(errs, field.Invalid(ep.Child("name"), env.Name, msg))
			}
			if env.ValueFrom != nil {
				sources := 0
				if env.ValueFrom.FieldRef != nil {
					sources++
				}
				if ref := env.ValueFrom.SecretKeyRef; ref != nil {
					sources++
					if ref.Name == "" || ref.Key == "" {
						errs = append(errs, field.Required(ep.Child("valueFrom", "secretKeyRef"), "name and key"))
					}
				}
				if env.ValueFrom.ConfigMapKeyRef != nil {
					sources++
				}
				if env.ValueFrom.ResourceFieldRef != nil {
					sources++
				}
				if sources != 1 {
					errs = append(errs, field.Invalid(ep.Child("valueFrom"), "", "exactly one source"))
				}
				if env.Value != "" {
					errs = append(errs, field.Invalid(ep.Child("value"), env.Value, "value and valueFrom together"))
				}
			}
		}
		mounts := map[string]bool{}
		for j, mount := range c.VolumeMounts {
			mp := cp.Child("volumeMounts").Index(j)
			if !volumes[mount.Name] && !claims[mount.Name] {
				errs = append(errs, field.NotFound(mp.Child("name"), mount.Name))
			}
			if mounts[mount.MountPath] {
				errs = append(errs, field.Duplicate(mp.Child("mountPath"), mount.MountPath))
			}
			mounts[mount.MountPath] = true
		}
		for name, probe := range map[string]*corev1.Probe{"readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe, "startupProbe": c.StartupProbe} {
			if probe != nil && probe.HTTPGet != nil {
				errs = append(errs, validateNamedPort(probe.HTTPGet.Port, ports, cp.Child(name, "httpGet", "port"))...)
			}
		}
	}
	return errs
}

func validateNamedPort(port intstr.IntOrString, declared map[string]bool, path *field.Path) field.ErrorList {
	if port.Type == intstr.String && !declared[port.StrVal] {
		return field.ErrorList{field.NotFound(path, port.StrVal)}
	}
	if port.Type == intstr.Int {
		if msgs := validation.IsValidPortNum(port.IntValue()); len(msgs) > 0 {
			return field.ErrorList{field.Invalid(path, port.IntValue(), msgs[0])}
		}
	}
	return nil
}

func validateServicePorts(ports []corev1.ServicePort, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if len(ports) == 0 {
		errs = append(errs, field.Required(path, ""))
	}
	names := map[string]bool{}
	for i, port := range ports {
		p := path.Index(i)
		if len(ports) > 1 && port.Name == "" {
			errs = append(errs, field.Required(p.Child("name"), "with more than one port"))
		}
		if port.Name != "" {
			for _, msg := range validation.IsDNS1123Label(port.Name) {
				errs = append(errs, field.Invalid(p.Child("name"), port.Name, msg))
			}
			if names[port.Name] {
				errs = append(errs, field.Duplicate(p.Child("name"), port.Name))
			}
			names[port.Name] = true
		}
		for _, msg := range validation.IsValidPortNum(int(port.Port)) {
			errs = append(errs, field.Invalid(p.Child("port"), port.Port, msg))
		}
		if port.TargetPort.Type == intstr.String {
			for _, msg := range validation.IsValidPortName(port.TargetPort.StrVal) {
				errs = append(errs, field.Invalid(p.Child("targetPort"), port.TargetPort.StrVal, msg))
			}
		}
	}
	return errs
}

func formatErrors(errs field.ErrorList) error {
	return fmt.Errorf("invalid: %s", errs.ToAggregate().Error())
}
